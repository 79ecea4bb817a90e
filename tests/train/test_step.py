"""The per-worker distillation step without Ray: steps and a checkpoint round trip, the in-process
loop of the benchmarks, and the attention kernels a step runs under."""

from __future__ import annotations

import json

import pytest
import torch

from dfkd_ray.config import validate_config
from dfkd_ray.confidence import fit_confidence
from dfkd_ray.train.epochs import StepPlan, student_num_blocks
from dfkd_ray.train.step import Distiller, train_in_process


@pytest.mark.parametrize("method", ["stratanet", "vanilla"])
def test_distiller_steps_and_checkpoint_round_trip(job_dict, teachers, synthetic_task, tmp_path, method):
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


def test_train_in_process_follows_the_plan_of_its_workers(job_dict, teachers):
    """The benchmarks' loop: the step plan of ``world_size`` workers, their batches taken together,
    one on_epoch call per epoch, the same run twice under one seed."""
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
    from dfkd_ray.orchestration.train import _TRAIN_ONLY_KEYS
    from dfkd_ray.train import step

    job_dict["amalgamation"] = {"method": "vanilla"}
    job_dict["student"]["num_layers"] = 3
    job_dict["train"] = {"epochs": 1, "warmup_epochs": 0, "batch_size": 2, "learning_rate": 1e-3, "sdpa": sdpa}
    cfg = validate_config(job_dict)
    calls = {"teacher": 0, "student": 0, "backward": 0}
    monkeypatch.setattr(step, "attention_kernels", kernel_recorder)
    d = Distiller(cfg, StepPlan.of(4, cfg), teachers=teachers)
    teacher_class = type(next(iter(teachers.values())))
    teacher_forward = teacher_class.forward_ids

    def counting_forward_ids(self, *a, **k):
        calls["teacher"] += kernel_recorder.inside
        return teacher_forward(self, *a, **k)

    monkeypatch.setattr(teacher_class, "forward_ids", counting_forward_ids)  # every teacher's forward
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


@pytest.mark.parametrize("precision,device,expected", [("auto", "cpu", None), ("auto", "cuda", torch.bfloat16),
                                                       ("float32", "cuda", None), ("bfloat16", "cpu", torch.bfloat16)])
def test_autocast_dtype_follows_precision_and_device(precision, device, expected):
    from dfkd_ray.train.step import autocast_dtype

    assert autocast_dtype(precision, device) == expected


def _stratanet(job_dict, teachers, **train):
    from dfkd_ray.transfer.schema import rows_to_table

    job_dict["amalgamation"] = {"method": "stratanet", "amalg_dim": 16, "amalg_heads": 2}
    job_dict["student"]["num_layers"] = 3
    job_dict["train"] = {"epochs": 1, "warmup_epochs": 0, "batch_size": 4, "learning_rate": 1e-3, **train}
    cfg = validate_config(job_dict)
    texts = ["the striker scored a late goal", "bake the bread with butter", "the rocket reached orbit",
             "shares fell on the stock market"]
    rows = [{"sample_id": f"{t}/{c}/{i}", "text": f"{texts[(2 * k + c) % 4]} {i}", "label": 0, "label_name": "x",
             "teacher": t, "teacher_class": c, "source": "corpus", "source_params": "{}", "confidence": 1.0,
             "num_tokens": 5, "seed": i, "heldout": True}
            for k, t in enumerate(teachers) for c in range(2) for i in range(6)]
    torch.manual_seed(0)
    return Distiller(cfg, StepPlan.of(16, cfg), teachers=teachers,
                     estimators=fit_confidence(cfg, rows_to_table(rows), teachers)), texts


def test_a_bfloat16_step_runs_the_student_in_bfloat16_and_keeps_the_rest_in_float32(job_dict, teachers):
    """``train.precision: bfloat16``: the student's layers compute in bfloat16 under autocast, while the
    teachers, the confidence statistics (the same confidences and KD weights as a float32 step), the
    weights and the optimiser state stay as they are."""
    runs = {}
    for precision in ("float32", "bfloat16"):
        d, texts = _stratanet(dict(job_dict), teachers, precision=precision)
        dtypes = []
        hook = d.student.model.register_forward_hook(lambda m, a, out: dtypes.append(out[0].dtype))
        losses = d.losses(texts)
        hook.remove()
        metrics = d.step(texts)
        params = {p.dtype for p in d.module.parameters()}
        states = {v.dtype for s in d.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.ndim}
        runs[precision] = (dtypes, losses, metrics, params, states)
    (d32, l32, m32, p32, s32), (d16, l16, m16, p16, s16) = runs["float32"], runs["bfloat16"]
    assert d32 == [torch.float32] and d16 == [torch.bfloat16]
    for key in l32:
        if key.startswith(("confidence/", "kd_weight/")):
            assert torch.equal(l32[key], l16[key]), key
    assert l32["loss"].dtype == l16["loss"].dtype == torch.float32
    assert m16["loss"] == pytest.approx(m32["loss"], rel=0.1) and m16["loss"] != m32["loss"]
    assert p32 == p16 == s32 == s16 == {torch.float32}


def test_a_non_finite_loss_stops_the_step_before_the_weights_change(job_dict, teachers, monkeypatch):
    d, texts = _stratanet(job_dict, teachers)
    real = d.losses

    def poisoned(batch):
        out = real(batch)
        out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(d, "losses", poisoned)
    before = {k: v.clone() for k, v in d.module.state_dict().items()}
    with pytest.raises(FloatingPointError, match="non-finite loss nan at step 0.*train.learning_rate"):
        d.step(texts)
    assert d.step_count == 0 and not d.optimizer.state
    assert all(torch.equal(before[k], v) for k, v in d.module.state_dict().items())


@pytest.mark.parametrize("method", ["stratanet", "vanilla"])
def test_a_step_on_an_encoded_batch_equals_a_step_on_its_texts(job_dict, teachers, method):
    """Training tokenizes batches away from the step (``Distiller.encode``); the step it then makes is
    the step on the raw texts: same metrics, same weights after."""
    job_dict["amalgamation"] = {"method": method, "amalg_dim": 16, "amalg_heads": 2}
    job_dict["student"]["num_layers"] = 3
    job_dict["train"] = {"epochs": 1, "warmup_epochs": 0, "batch_size": 4, "learning_rate": 1e-3}
    cfg = validate_config(job_dict)
    texts = ["the striker scored a late goal", "bake the bread with butter", "the rocket reached orbit",
             "shares fell on the stock market"]
    estimators = _estimators(cfg, teachers, texts) if method == "stratanet" else None
    runs = []
    for encoded in (False, True):
        torch.manual_seed(1)
        d = Distiller(cfg, StepPlan.of(8, cfg), teachers=teachers, estimators=estimators)
        batch = d.encode(texts) if encoded else texts
        if encoded:
            assert len(batch) == 4 and set(batch.teachers) == set(teachers)
            assert batch.student["input_ids"].device.type == "cpu" and batch.student["input_ids"].shape[0] == 4
        runs.append((d.step(batch), [p.detach().clone() for p in d.module.parameters()]))
    (m_text, p_text), (m_enc, p_enc) = runs
    assert m_text == m_enc
    assert all(torch.equal(a, b) for a, b in zip(p_text, p_enc))


def _estimators(cfg, teachers, texts):
    from dfkd_ray.transfer.schema import rows_to_table

    rows = [{"sample_id": f"{t}/{c}/{i}", "text": f"{texts[(2 * k + c) % 4]} {i}", "label": 0, "label_name": "x",
             "teacher": t, "teacher_class": c, "source": "corpus", "source_params": "{}", "confidence": 1.0,
             "num_tokens": 5, "seed": i, "heldout": True}
            for k, t in enumerate(teachers) for c in range(2) for i in range(6)]
    return fit_confidence(cfg, rows_to_table(rows), teachers)


def test_matmul_precision_is_set_on_gpus_only_and_checked_where_the_config_loads(job_dict, teachers):
    """TF32 (``high``, the default) reaches CUDA's float32 products; a CPU distiller leaves torch's
    setting alone (torch would map it to oneDNN's reduced-precision modes)."""
    from dfkd_ray.config import ConfigError
    from dfkd_ray.models.kernels import set_matmul_precision

    job_dict["amalgamation"] = {"method": "vanilla"}
    job_dict["student"]["num_layers"] = 3
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        job_dict["train"] = {"epochs": 1, "warmup_epochs": 0, "batch_size": 2}
        cfg = validate_config(job_dict)
        assert cfg.train.matmul_precision == "high"
        Distiller(cfg, StepPlan.of(4, cfg), teachers=teachers)  # on the CPU
        assert torch.get_float32_matmul_precision() == "highest"
        for value in ("high", "highest"):
            assert set_matmul_precision(value, torch.device("cuda"))  # what a GPU distiller calls
            assert torch.get_float32_matmul_precision() == value
        assert not set_matmul_precision("high", torch.device("cpu"))
        assert torch.get_float32_matmul_precision() == "highest"
    finally:
        torch.set_float32_matmul_precision(before)
    job_dict["train"] = {"matmul_precision": "tf32"}
    with pytest.raises(ConfigError, match="train.matmul_precision.*'highest' or 'high'"):
        validate_config(job_dict)


def test_encoded_batches_carry_each_rows_source_teacher_and_refuse_foreign_ones(job_dict, teachers):
    """``kd_source_weight`` reads the teacher each row was made for: ``encode`` maps names to teacher
    indices, refuses a name the config does not have, and a step on bare texts is refused."""
    job_dict["amalgamation"] = {"amalg_dim": 16, "amalg_heads": 2, "kd_source_weight": 1.0}
    job_dict["student"]["num_layers"] = 3
    job_dict["train"] = {"epochs": 1, "warmup_epochs": 0, "batch_size": 4, "learning_rate": 1e-3}
    cfg = validate_config(job_dict)
    texts = ["the striker scored a late goal", "bake the bread with butter", "the rocket reached orbit",
             "shares fell on the stock market"]
    names = [t.name for t in cfg.teachers]
    d = Distiller(cfg, StepPlan.of(8, cfg), teachers=teachers, estimators=_estimators(cfg, teachers, texts))
    batch = d.encode(texts, [names[0], names[0], names[1], names[1]])
    assert batch.source_teachers.tolist() == [0, 0, 1, 1]
    metrics = d.step(batch)
    assert [metrics[f"kd_weight/{n}"] for n in names] == [0.5, 0.5]  # one-hot weights, two rows each
    # a row made for no teacher (a corpus document of train.corpus_share) keeps its confidence weights
    assert d.encode(texts, [names[0], "", names[1], ""]).source_teachers.tolist() == [0, -1, 1, -1]
    with pytest.raises(ValueError, match=r"teachers \['gamma'\], which the config does not name"):
        d.encode(texts, [names[0], "gamma", names[1], names[1]])
    with pytest.raises(ValueError, match="4 texts but 3 source teachers"):
        d.encode(texts, names + names[:1])
    with pytest.raises(ValueError, match="kd_source_weight > 0 needs each row's source teacher"):
        d.step(texts)


@pytest.mark.parametrize("fields,message", [
    ({"amalgamation": {"method": "vanilla", "kd_source_weight": 0.5}}, "method is vanilla"),
    ({"amalgamation": {"method": "stratanet", "kd_source_weight": 0.5}, "transfer": {"source": "embedding_guessing"}},
     "embedding_guessing crafts pseudo-embeddings"),
    ({"amalgamation": {"method": "stratanet", "kd_source_weight": 1.5}}, "less than or equal to 1"),
])
def test_kd_source_weight_is_checked_where_the_config_loads(job_dict, fields, message):
    from dfkd_ray.config import ConfigError

    for section, values in fields.items():
        job_dict[section] = {**job_dict.get(section, {}), **values}
    with pytest.raises(ConfigError, match=r"amalgamation.kd_source_weight[\s\S]*" + message):
        validate_config(job_dict)


def test_a_batch_is_tokenized_once_for_the_models_that_share_an_encoding(job_dict, synthetic_task):
    """Two teachers from one directory share one tokenization of a batch (and one device copy in
    the step); a teacher with another tokenizer gets its own; every model's inputs equal its own
    tokenization."""
    from dfkd_ray.models.teacher import Teacher

    paths = {"alpha": synthetic_task.teachers["alpha"], "alpha_copy": synthetic_task.teachers["alpha"],
             "beta": synthetic_task.teachers["beta"]}
    job_dict["teachers"] = [{"name": n, "path": str(p)} for n, p in paths.items()]
    job_dict["amalgamation"] = {"method": "vanilla"}
    job_dict["student"]["num_layers"] = 3
    job_dict["train"] = {"epochs": 1, "warmup_epochs": 0, "batch_size": 2}
    cfg = validate_config(job_dict)
    teachers = {n: Teacher.from_pretrained(n, p, num_blocks=3) for n, p in paths.items()}
    d = Distiller(cfg, StepPlan.of(4, cfg), teachers=teachers)
    texts = ["the striker scored a late goal", "shares fell on the stock market"]
    batch = d.encode(texts)
    assert batch.teachers["alpha"] is batch.teachers["alpha_copy"]
    assert batch.teachers["beta"] is not batch.teachers["alpha"]
    for name, teacher in teachers.items():
        own = teacher.host_inputs(texts)
        assert own.keys() == batch.teachers[name].keys()
        assert all(torch.equal(own[k], batch.teachers[name][k]) for k in own)
    own = d.student.host_inputs(texts)
    assert all(torch.equal(own[k], batch.student[k]) for k in own)
    assert torch.isfinite(torch.tensor(d.step(batch)["loss"]))


def test_the_step_passes_prepared_masks_and_its_losses_equal_those_of_the_plain_masks(job_dict, teachers):
    """The distiller checks once per model that the 4D mask gives the same outputs and then uses it;
    the step's losses equal those with the (B, T) masks."""
    job_dict["amalgamation"] = {"amalg_dim": 16, "amalg_heads": 2}
    job_dict["student"]["num_layers"] = 3
    job_dict["train"] = {"epochs": 1, "warmup_epochs": 0, "batch_size": 4}
    cfg = validate_config(job_dict)
    texts = ["the striker scored a late goal", "bake the bread", "the rocket reached a stable orbit round the moon",
             "shares fell"]
    d = Distiller(cfg, StepPlan.of(8, cfg), teachers=teachers, estimators=_estimators(cfg, teachers, texts))
    models = [d.student, *teachers.values()]
    assert all(m.prepared_mask for m in models)
    d.model.eval()  # no dropout: the two passes must see the same network
    batch = d.encode(texts)
    with torch.no_grad():
        prepared = d.losses(batch)
        for m in models:
            m.prepared_mask = False
        plain = d.losses(batch)
    for key in ("loss", "kd", "block"):
        assert torch.allclose(prepared[key], plain[key], atol=1e-5), key


def test_padding_to_a_multiple_pads_every_model_and_leaves_the_losses_as_they_were(job_dict, teachers):
    """``train.pad_to_multiple_of`` rounds every model's token length up; the padded positions are masked,
    so the losses are those of the batch padded to its longest text."""
    job_dict["amalgamation"] = {"amalg_dim": 16, "amalg_heads": 2}
    job_dict["student"]["num_layers"] = 3
    texts = ["the striker scored a late goal", "bake the bread", "the rocket reached a stable orbit round the moon",
             "shares fell"]
    losses = {}
    for multiple in (1, 16):
        job_dict["train"] = {"epochs": 1, "warmup_epochs": 0, "batch_size": 4, "pad_to_multiple_of": multiple}
        cfg = validate_config(job_dict)
        torch.manual_seed(1)
        d = Distiller(cfg, StepPlan.of(8, cfg), teachers=teachers, estimators=_estimators(cfg, teachers, texts))
        batch = d.encode(texts)
        widths = [batch.student["input_ids"].shape[1]] + [e["input_ids"].shape[1] for e in batch.teachers.values()]
        if multiple == 16:
            assert all(w % 16 == 0 for w in widths) and max(widths) > max(narrow), (widths, narrow)
        narrow = widths
        d.model.eval()  # no dropout: both runs must see the same network
        with torch.no_grad():
            losses[multiple] = d.losses(batch)
    for key in ("loss", "kd", "block"):
        assert torch.allclose(losses[1][key], losses[16][key], atol=1e-5), key


def test_a_compiled_step_equals_the_eager_step_and_leaves_the_callers_teachers_eager(job_dict, teachers, tmp_path,
                                                                                     monkeypatch):
    """``train.compile`` runs the student's and the teachers' models through ``torch.compile``: the
    losses and the step's update equal the eager ones, the student's checkpoint keys and export stay
    those of the plain model, and the teachers handed in stay eager. (Compiled here with the
    ``aot_eager`` backend: the same tracing and autograd graphs as inductor, without generating kernels,
    which takes minutes on two cores.)"""
    compiled_modes = []
    real_compile = torch.compile

    def compile_for_test(model=None, *, mode=None, **kwargs):
        compiled_modes.append(mode)
        return real_compile(model, backend="aot_eager", **kwargs)

    monkeypatch.setattr(torch, "compile", compile_for_test)
    job_dict["amalgamation"] = {"amalg_dim": 16, "amalg_heads": 2}
    job_dict["student"]["num_layers"] = 3
    texts = ["the striker scored a late goal", "bake the bread", "the rocket reached a stable orbit round the moon",
             "shares fell"]
    runs = {}
    for mode in ("none", "default"):
        job_dict["train"] = {"epochs": 1, "warmup_epochs": 0, "batch_size": 4, "learning_rate": 1e-3,
                             "compile": mode, "pad_to_multiple_of": 8}
        cfg = validate_config(job_dict)
        torch.manual_seed(1)
        d = Distiller(cfg, StepPlan.of(8, cfg), teachers=teachers, estimators=_estimators(cfg, teachers, texts))
        for m in d.module.modules():  # the step below trains: no dropout, so both runs see one network
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        d.model.eval()
        with torch.no_grad():
            losses = {k: v.clone() for k, v in d.losses(d.encode(texts)).items()}
        metrics = d.step(texts)
        runs[mode] = (losses, metrics, d)
    (eager_losses, eager_metrics, eager), (losses, metrics, d) = runs["none"], runs["default"]
    assert compiled_modes == ["default"] * (1 + len(teachers))  # the student and each teacher, once
    for key in ("loss", "kd", "block"):
        assert torch.allclose(eager_losses[key], losses[key], atol=1e-5), key
    assert metrics["loss"] == pytest.approx(eager_metrics["loss"], abs=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(eager.module.parameters(), d.module.parameters()))
    assert all(type(t.model) is type(d.teachers[n].model._orig_mod) for n, t in teachers.items())  # callers' eager
    assert list(d.module.state_dict()) == list(eager.module.state_dict())
    d.save_checkpoint(tmp_path / "ckpt", epoch=0, batch=1)
    eager.load_checkpoint(tmp_path / "ckpt")  # a compiled run's checkpoint loads into an eager distiller
    exported = d.export(tmp_path / "student")
    assert (exported / "model.safetensors").is_file()


@pytest.mark.parametrize("fields, message", [
    ({"train": {"compile": "max-autotune"}}, "train.compile.*'none', 'default', 'reduce-overhead'"),
    ({"train": {"pad_to_multiple_of": 48}}, r"train.pad_to_multiple_of \(48\) must divide.*student.max_length is 128"),
    ({"train": {"compile": "default"}, "transfer": {"source": "embedding_guessing"}},
     "train.compile.*embedding_guessing.*set train.compile: none"),
])
def test_compile_settings_are_checked_where_the_config_loads(job_dict, fields, message):
    from dfkd_ray.config import ConfigError

    for section, values in fields.items():
        job_dict[section] = {**job_dict.get(section, {}), **values}
    with pytest.raises(ConfigError, match=message):
        validate_config(job_dict)
