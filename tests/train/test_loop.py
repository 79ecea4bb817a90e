"""Distillation engine pieces without Ray: the vanilla target, the centred block loss, the step
plan, epoch iteration with resume, stage records, and a Distiller checkpoint round trip."""

from __future__ import annotations

import json

import pytest
import torch

from dfkd_ray.config import validate_config
from dfkd_ray.train.loop import Distiller, MetricsLog, StepPlan, iterate_epochs
from dfkd_ray.math.losses import block_loss, concat_target
from dfkd_ray.stages import StageMismatch, mark_done, stage_done


def test_concat_target_is_one_softmax_over_all_teachers():
    z1, z2 = torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, -1.0, 3.0]])
    idx = [torch.tensor([0, 1]), torch.tensor([2, 1, 3])]  # label 1 shared by both teachers
    p = concat_target([z1, z2], idx, 4, temperature=0.5)
    q = torch.softmax(torch.tensor([2.0, 0.0, 1.0, -1.0, 3.0]) / 0.5, -1)
    assert torch.allclose(p[0], torch.stack([q[0], q[1] + q[3], q[2], q[4]]))
    assert torch.allclose(p.sum(-1), torch.ones(1))
    with pytest.raises(ValueError, match="label indices"):
        concat_target([z1], [torch.tensor([0, 9])], 4)


def test_centred_block_loss_ignores_a_shared_component():
    g = torch.Generator().manual_seed(0)
    s, a = torch.randn(6, 2, 8, generator=g), torch.randn(6, 2, 8, generator=g)
    shift = 50 * torch.randn(1, 2, 8, generator=g)  # one vector added to every target
    assert torch.allclose(block_loss(s, a + shift, center=True), block_loss(s, a, center=True), atol=1e-4)
    assert not torch.allclose(block_loss(s, a + shift), block_loss(s, a), atol=1e-2)
    # matching only the shared part: zero uncentred loss is reachable by a constant, not the centred one
    assert block_loss(shift.expand(6, 2, 8), a + shift) < 0.5 < block_loss(shift.expand(6, 2, 8) + 1e-3 * s, a + shift, center=True)
    with pytest.raises(ValueError, match="at least 2"):
        block_loss(s[:1], a[:1], center=True)


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


def test_stage_records_skip_same_and_refuse_changed(tmp_path):
    desc = {"train": {"epochs": 3}, "seed": 0}
    assert not stage_done(tmp_path, desc, stage="distill")
    mark_done(tmp_path, desc, steps=10)
    assert stage_done(tmp_path, desc, stage="distill")
    with pytest.raises(StageMismatch, match=r"train\.epochs: 3 -> 4"):
        stage_done(tmp_path, {"train": {"epochs": 4}, "seed": 0}, stage="distill")


def test_metrics_log_drops_lines_after_the_resumed_checkpoint(tmp_path):
    log = MetricsLog(tmp_path / "m.jsonl")
    for step in (2, 4, 6, 8):
        log.write({"step": step, "loss": 1.0 / step})
    log = MetricsLog(tmp_path / "m.jsonl", resume_step=4)
    assert [r["step"] for r in log.read()] == [2, 4]
    log.write({"step": 6, "loss": 0.1})
    assert log.plot(tmp_path / "c.png").stat().st_size > 5_000


@pytest.mark.parametrize("method", ["stratanet", "vanilla"])
def test_distiller_steps_and_checkpoint_round_trip(job_dict, teachers, synthetic_task, tmp_path, method):
    from dfkd_ray.train.loop import fit_confidence, student_num_blocks
    from dfkd_ray.transfer.schema import rows_to_table

    job_dict["amalgamation"] = {"method": method, "amalg_dim": 16, "amalg_heads": 2}
    job_dict["student"]["num_layers"] = 3  # N = 3, as the fixture teachers are loaded
    job_dict["train"] = {"epochs": 1, "warmup_epochs": 0, "batch_size": 4, "learning_rate": 1e-3}
    cfg = validate_config(job_dict)
    texts = ["the striker scored a late goal", "bake the bread with butter", "the rocket reached orbit",
             "shares fell on the stock market"] * 4
    estimators = None
    if method == "stratanet":
        assert student_num_blocks(cfg) == next(iter(teachers.values())).num_blocks
        rows = [{"sample_id": f"{t}/{c}/{i}", "text": texts[(2 * k + c) % 4], "label": 0, "label_name": "x",
                 "teacher": t, "teacher_class": c, "source": "corpus", "source_params": "{}", "confidence": 1.0,
                 "num_tokens": 5, "seed": i, "heldout": True}
                for k, t in enumerate(teachers) for c in range(2) for i in range(6)]
        estimators = fit_confidence(cfg, rows_to_table(rows), teachers)
    plan = StepPlan.of(16, cfg)
    d = Distiller(cfg, plan, teachers=teachers, estimators=estimators)
    m = d.step(texts[:4])
    assert m["step"] == 1 and m["loss"] > 0 and ("block" in m) == (method == "stratanet")
    d.save_checkpoint(tmp_path / "ckpt", epoch=0, batch=1)
    after = d.step(texts[4:8])
    fresh = Distiller(cfg, plan, teachers=teachers, estimators=estimators)
    state = fresh.load_checkpoint(tmp_path / "ckpt")
    assert state == {"step": 1, "epoch": 0, "batch": 1}
    torch.manual_seed(0)
    again = fresh.step(texts[4:8])
    assert again["step"] == 2 and abs(again["lr"] - after["lr"]) < 1e-12
    exported = d.export(tmp_path / "student")
    assert json.loads((exported / "config.json").read_text())["id2label"]["0"] == d.space.names[0]


def test_too_few_heldout_rows_for_the_calibration_folds_fail_before_any_teacher_runs(job_dict):
    from dfkd_ray.train.loop import fit_confidence
    from dfkd_ray.transfer.schema import rows_to_table

    class Untouchable:
        def __call__(self, *a, **k):
            raise AssertionError("a teacher ran before the held-out rows were counted")

    rows = [{"sample_id": f"{t}/{i}", "text": f"text {i}", "label": 0, "label_name": "x", "teacher": t,
             "teacher_class": i % 2, "source": "corpus", "source_params": "{}", "confidence": 1.0,
             "num_tokens": 2, "seed": i, "heldout": True} for t in ("alpha", "beta") for i in range(10)]
    job_dict["amalgamation"] = {"calibration_folds": 9}
    with pytest.raises(ValueError, match=r"need >= 11 per teacher with amalgamation.calibration_folds 9"):
        fit_confidence(validate_config(job_dict), rows_to_table(rows), {"alpha": Untouchable(), "beta": Untouchable()})


def test_train_in_process_follows_the_plan_of_its_workers(job_dict, teachers):
    """The benchmarks' loop: the step plan of ``world_size`` workers, their batches taken together,
    one on_epoch call per epoch, the same run twice under one seed."""
    from dfkd_ray.train.loop import train_in_process

    job_dict["amalgamation"] = {"method": "vanilla"}
    job_dict["student"]["num_layers"] = 3
    job_dict["train"] = {"epochs": 2, "warmup_epochs": 0, "batch_size": 2, "learning_rate": 1e-3}
    cfg = validate_config(job_dict)
    texts = [f"the striker scored goal {i}" if i % 2 else f"bake bread with butter {i}" for i in range(17)]
    epochs = []
    d, last = train_in_process(cfg, texts, teachers=teachers, world_size=2,
                               on_epoch=lambda e, m: epochs.append((e, m["step"])))
    assert (d.plan.steps_per_epoch, d.plan.total_steps) == (4, 8)  # 8 rows per worker / batch 2
    assert epochs == [(0, 4), (1, 8)] and last["step"] == d.step_count == 8
    _, again = train_in_process(cfg, texts, teachers=teachers, world_size=2)
    assert again["loss"] == pytest.approx(last["loss"])


@pytest.mark.parametrize("sdpa", ["no_cudnn", "any"])
def test_distillation_step_runs_under_its_attention_kernels(job_dict, teachers, monkeypatch, kernel_recorder, sdpa):
    """Teachers, student and backward run inside ``attention_kernels(train.sdpa)``; the choice picks
    kernels, not what is trained, so it stays out of the distill stage's record."""
    from dfkd_ray.distill import loop
    from dfkd_ray.orchestration.train import _TRAIN_ONLY_KEYS

    job_dict["amalgamation"] = {"method": "vanilla"}
    job_dict["student"]["num_layers"] = 3
    job_dict["train"] = {"epochs": 1, "warmup_epochs": 0, "batch_size": 2, "learning_rate": 1e-3, "sdpa": sdpa}
    cfg = validate_config(job_dict)
    calls = {"teacher": 0, "student": 0, "backward": 0}
    monkeypatch.setattr(loop, "attention_kernels", kernel_recorder)
    d = Distiller(cfg, StepPlan.of(4, cfg), teachers=teachers)
    teacher_class = type(next(iter(teachers.values())))
    teacher_call = teacher_class.__call__

    def counting_call(self, *a, **k):
        calls["teacher"] += kernel_recorder.inside
        return teacher_call(self, *a, **k)

    monkeypatch.setattr(teacher_class, "__call__", counting_call)  # every teacher's forward
    student_forward = d.model.forward

    def counting_forward(*a, **k):
        calls["student"] += kernel_recorder.inside
        out = student_forward(*a, **k)
        out.logits.register_hook(lambda g: calls.__setitem__("backward", calls["backward"] + kernel_recorder.inside))
        return out

    monkeypatch.setattr(d.model, "forward", counting_forward)
    d.step(["the striker scored", "bake the bread"])
    assert kernel_recorder.seen == [sdpa]
    assert calls == {"teacher": len(teachers), "student": 1, "backward": 1}
    assert "sdpa" in _TRAIN_ONLY_KEYS
