"""The GPU part of the resource plan, checked before Ray starts: fractional shares are placed on one
GPU each (Ray never splits a share across GPUs), so a plan whose shares add up to fewer GPUs than
the machine has can still be one Ray would wait on forever. No teacher directories are read."""

from __future__ import annotations

import pytest

from dfkd_ray.config import ConfigError, validate_config
from dfkd_ray.preflight import gpus_held, local_resources, resource_plan_problems


def plan(tmp_path, stream: bool = False, **ray) -> object:
    return validate_config({"name": "plan", "teachers": [{"name": "t", "path": str(tmp_path / "t")}],
                            "transfer": {"source": "random_words"}, "train": {"stream_from_generation": stream},
                            "ray": ray, "output": {"dir": str(tmp_path / "out")}})


@pytest.mark.parametrize("processes, share, gpus", [
    (3, 0.6, 3),     # 0.6 + 0.6 > 1: one a GPU (Ray placed two such actors on two GPUs and left the third waiting)
    (4, 0.25, 1),
    (5, 0.25, 2),
    (3, 0.3333, 1),  # Ray books in units of 0.0001: three of 0.3333 fill one GPU
    (2, 0.5, 1),
    (2, 2.0, 4),
])
def test_gpus_held_packs_shares_into_whole_gpus(processes, share, gpus):
    assert gpus_held(processes, share) == gpus


def test_shares_that_sum_below_the_gpus_but_do_not_pack_are_refused_with_the_numbers(tmp_path):
    cfg = plan(tmp_path, num_generation_actors=3, gpus_per_generation_actor=0.6)
    problems = dict(resource_plan_problems(cfg, {"CPU": 16, "GPU": 2}))
    assert list(problems) == ["ray.gpus_per_generation_actor"], problems
    message = problems["ray.gpus_per_generation_actor"]
    assert "3 generation actors x 0.6 GPUs (at most 1 a GPU) = 3 GPUs; this machine has 2 GPUs" in message
    assert "lower ray.num_generation_actors or ray.gpus_per_generation_actor" in message
    assert not resource_plan_problems(cfg, {"CPU": 16, "GPU": 3})


def test_fractional_layouts_that_fill_one_gpu_pass(tmp_path):
    for actors, share in ((4, 0.25), (2, 0.5), (1, 1.0)):
        cfg = plan(tmp_path, num_generation_actors=actors, gpus_per_generation_actor=share, use_gpu=True)
        assert not resource_plan_problems(cfg, {"CPU": 16, "GPU": 1}), (actors, share)
    cfg = plan(tmp_path, num_generation_actors=5, gpus_per_generation_actor=0.25)
    message = dict(resource_plan_problems(cfg, {"CPU": 16, "GPU": 1}))["ray.gpus_per_generation_actor"]
    assert "5 generation actors x 0.25 GPUs (at most 4 a GPU) = 2 GPUs; this machine has 1 GPU" in message


def test_streaming_needs_the_train_workers_gpus_besides_the_actors_shares(tmp_path):
    cfg = plan(tmp_path, stream=True, num_generation_actors=4, gpus_per_generation_actor=0.25, use_gpu=True)
    problems = dict(resource_plan_problems(cfg, {"CPU": 16, "GPU": 1}))
    (message,) = problems.values()
    assert ("1 train workers x 1 GPU and 4 generation actors x 0.25 GPUs (at most 4 a GPU) at once "
            "(train.stream_from_generation) = 2 GPUs; this machine has 1 GPU") in message
    assert "train.stream_from_generation=false" in message
    assert not resource_plan_problems(cfg, {"CPU": 16, "GPU": 2})


def test_the_local_plan_counts_this_machines_gpus(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    cfg = plan(tmp_path, num_generation_actors=2, gpus_per_generation_actor=0.75)
    have = local_resources(cfg)
    assert have["GPU"] == 1
    assert "= 2 GPUs; this machine has 1 GPU" in dict(resource_plan_problems(cfg, have))["ray.gpus_per_generation_actor"]


@pytest.mark.parametrize("share, words", [(1.5, "a share of one GPU (below 1) or whole GPUs"),
                                          (0.00001, "the smallest GPU share Ray books")])
def test_a_gpu_share_ray_cannot_book_is_a_config_error(tmp_path, share, words):
    """Ray raises ValueError for 1.5 GPUs ("GPU resource quantities >1 must be whole numbers") when
    the actor is created, inside the generation stage; the config says so when it loads."""
    with pytest.raises(ConfigError) as err:
        plan(tmp_path, gpus_per_generation_actor=share)
    problems = dict(err.value.problems)
    assert list(problems) == ["ray.gpus_per_generation_actor"]
    assert words in problems["ray.gpus_per_generation_actor"]
    assert plan(tmp_path, gpus_per_generation_actor=2).ray.gpus_per_generation_actor == 2
