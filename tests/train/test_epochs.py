"""The step plan and epoch iteration with resume."""

from __future__ import annotations

import pytest

from dfkd_ray.config import validate_config
from dfkd_ray.train.epochs import StepPlan, iterate_epochs


def test_step_plan_and_resumed_iteration(job_dict):
    job_dict["train"] = {"epochs": 2.5, "warmup_epochs": 1, "batch_size": 4}
    cfg = validate_config(job_dict)
    plan = StepPlan.of(50, cfg, world_size=2)  # 25 rows per worker -> 6 full batches per epoch
    assert (plan.steps_per_epoch, plan.total_steps, plan.warmup_steps) == (6, 15, 6)
    with pytest.raises(ValueError, match="num_train_workers"):
        StepPlan.of(1, cfg, world_size=2)

    def batches(epoch):
        return iter([(epoch, i) for i in range(7)])  # one more than a full epoch: never read

    full = list(iterate_epochs(batches, plan))
    assert len(full) == 15 and full[6] == (1, 0, (1, 0)) and full[-1] == (2, 2, (2, 2))
    resumed = list(iterate_epochs(batches, plan, start_epoch=1, skip_batches=2))
    assert resumed == full[8:]
    with pytest.raises(ValueError, match="no full batch"):  # an empty epoch must not loop forever
        list(iterate_epochs(lambda epoch: iter([]), plan))


def test_prefetch_stops_its_thread_when_the_consumer_stops_early():
    """A loop that stops before the end (the plan's last step) leaves no thread filling a queue."""
    import itertools
    import threading
    import time

    from dfkd_ray.train.epochs import prefetch

    made = []

    def endless():
        for i in itertools.count():
            made.append(i)
            yield i

    it = prefetch(endless(), size=1)
    assert [next(it), next(it)] == [0, 1]
    it.close()
    deadline = time.time() + 5
    while any(t.name == "prefetch" and t.is_alive() for t in threading.enumerate()) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(t.name == "prefetch" and t.is_alive() for t in threading.enumerate())
    assert len(made) <= 4  # at most the queue's size and one item in hand beyond what was taken
