"""The full amalgamation step with the heterogeneous fixture teachers (alpha: BERT 2 layers x 32; beta:
DistilBERT 3 layers x 48): losses, KD weights, gradients, errors, DDP."""

from __future__ import annotations

import multiprocessing
import os
import sys
import traceback

import pytest
import torch
import torch.nn.functional as F

from dfkd_ray.config import AmalgamationConfig, StudentConfig
from dfkd_ray.confidence import fit_estimators
from dfkd_ray.labels import UnionLabelSpace
from dfkd_ray.math.amalgamation import kd_teacher_weights
from dfkd_ray.math.losses import kd_loss, union_target
from dfkd_ray.models.amalgamator import Amalgamator, amalgamation_step
from dfkd_ray.models.student import Student
from dfkd_ray.models.teacher import run_teachers


pytestmark = pytest.mark.usefixtures("seeded_single_thread")


TEXTS = ["the striker scored a goal in the final match", "simmer the garlic sauce in the skillet",
         "the rocket reached lunar orbit after launch", "bank shares fell as inflation hit the market"]


@pytest.fixture(scope="module")
def heldout():
    from dfkd_ray.synthetic import TEACHER_TOPICS, labelled_sentences

    rows = {n: labelled_sentences(30, seed=200 + i, topics=topics) for i, (n, topics) in enumerate(TEACHER_TOPICS.items())}
    return {n: [t for t, _ in r] for n, r in rows.items()}, \
           {n: [TEACHER_TOPICS[n].index(c) for _, c in r] for n, r in rows.items()}


@pytest.fixture(scope="module")
def fitted(teachers, heldout):
    texts, classes = heldout
    fits = {m: fit_estimators(teachers, texts, classes, AmalgamationConfig(confidence=m), seed=0)
            for m in ("rmd", "md", "msp")}
    # centred lower, so that the two teachers' confidences differ on TEXTS at gamma 1 (the golden KD check)
    fits["rmd_q95"] = fit_estimators(teachers, texts, classes, AmalgamationConfig(confidence_center="quantile",
                                                                                 confidence_quantile=0.95), seed=0)
    return fits


def build(synthetic_task, teachers, cfg: AmalgamationConfig, num_layers: int = 3):
    torch.manual_seed(0)
    space = UnionLabelSpace.from_teachers({n: t.labels for n, t in teachers.items()})
    student = Student.from_config(StudentConfig(path=synthetic_task.student, num_layers=num_layers),
                                  labels=space.names, amalg_dim=cfg.amalg_dim)
    return Amalgamator.build(student, teachers, space, cfg)


@pytest.mark.parametrize("confidence", ["rmd", "md", "msp"])
@pytest.mark.parametrize("fusion", ["st", "mul", "no_st"])
def test_step_shapes_and_finite_losses(synthetic_task, teachers, fitted, confidence, fusion):
    cfg = AmalgamationConfig(confidence=confidence, fusion=fusion, amalg_dim=16, amalg_heads=2)
    model = build(synthetic_task, teachers, cfg)
    losses = amalgamation_step(model, TEXTS, teachers=teachers, estimators=fitted[confidence])
    assert {"loss", "block", "kd", "agreement", "target_spread", "confidence/alpha", "confidence/beta",
            "kd_weight/alpha", "kd_weight/beta"} <= set(losses)
    assert all(v.ndim == 0 and torch.isfinite(v) for v in losses.values())
    assert losses["loss"].item() == pytest.approx(cfg.alpha * losses["block"].item() + cfg.beta * losses["kd"].item(),
                                                  rel=1e-5)
    assert 0 <= losses["block"].item() <= 4 * model.student.num_blocks and losses["kd"].item() >= 0
    assert losses["kd_weight/alpha"].item() + losses["kd_weight/beta"].item() == pytest.approx(1.0)
    assert 0.0 < losses["target_spread"].item() <= 1.0  # distinct texts give distinct targets at init
    assert all(not v.requires_grad for k, v in losses.items() if k not in ("loss", "block", "kd"))


def test_rmd_weights_each_teacher_up_on_its_own_topics(synthetic_task, teachers, fitted):
    """A teacher's KD weight and confidence are higher on its own topics than on the other teacher's.

    Compared across topics rather than against fixed levels: the synthetic teachers are trained at
    fixture build time and their exact confidences vary between builds (thread counts).
    """
    from dfkd_ray.synthetic import TEACHER_TOPICS, labelled_sentences

    model = build(synthetic_task, teachers, AmalgamationConfig(amalg_dim=16, amalg_heads=2))
    on = {owner: amalgamation_step(model, [t for t, _ in labelled_sentences(10, seed=300, topics=topics)],
                                   teachers=teachers, estimators=fitted["rmd"])
          for owner, topics in TEACHER_TOPICS.items()}
    for k, other in (("alpha", "beta"), ("beta", "alpha")):
        assert on[k][f"kd_weight/{k}"].item() > on[other][f"kd_weight/{k}"].item() + 0.3
        assert on[k][f"confidence/{k}"].item() > on[k][f"confidence/{other}"].item() + 0.3


def test_step_gradients_reach_student_projections_and_fusion_never_teachers(synthetic_task, teachers, fitted):
    """With ``train_fusion: true`` (the paper's ST-amalg) the fusion learns too; the teachers never do."""
    model = build(synthetic_task, teachers, AmalgamationConfig(amalg_dim=16, amalg_heads=2, train_fusion=True))
    before = {n: {k: v.clone() for k, v in t.model.state_dict().items()} for n, t in teachers.items()}
    outputs = run_teachers(teachers, TEXTS)
    assert all(not o.block_states.requires_grad and not o.logits.requires_grad for o in outputs.values())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = amalgamation_step(model, TEXTS, teachers=teachers, estimators=fitted["rmd"])
    losses["loss"].backward()
    groups = {"encoder": model.student.model.base_model, "classifier": model.student.model.classifier,
              "projections": model.student.proj, "fusion": model.fusion}
    for group, module in groups.items():
        grads = [p.grad for p in module.parameters()]
        assert grads and all(g is not None for g in grads), group
        assert sum(g.abs().sum() for g in grads) > 0, group
    opt.step()
    for n, t in teachers.items():
        assert all(not p.requires_grad and p.grad is None for p in t.model.parameters())
        assert all(torch.equal(v, before[n][k]) for k, v in t.model.state_dict().items())
    assert not any(p is q for p in model.parameters() for t in teachers.values() for q in t.model.parameters())


def test_precomputed_teacher_outputs_give_the_same_losses(synthetic_task, teachers, fitted):
    model = build(synthetic_task, teachers, AmalgamationConfig(amalg_dim=16, amalg_heads=2)).eval()
    a = amalgamation_step(model, {"text": TEXTS}, teachers=teachers, estimators=fitted["rmd"])
    b = amalgamation_step(model, TEXTS, teacher_outputs=run_teachers(teachers, TEXTS), estimators=fitted["rmd"])
    for k in a:
        torch.testing.assert_close(a[k], b[k])


@pytest.mark.parametrize("power", [1.0, 8.0])
def test_step_kd_is_against_the_confidence_weighted_union_target(synthetic_task, teachers, fitted, power):
    """Golden check of the KD term with heterogeneous teachers: weights are the last block's c_k^N raised
    to ``kd_confidence_power`` and normalised."""
    cfg = AmalgamationConfig(amalg_dim=16, amalg_heads=2, kd_confidence_power=power)
    model = build(synthetic_task, teachers, cfg).eval()
    losses = amalgamation_step(model, TEXTS, teachers=teachers, estimators=fitted["rmd_q95"])
    outs = run_teachers(teachers, TEXTS)
    space = UnionLabelSpace.from_teachers({n: t.labels for n, t in teachers.items()})
    conf = {n: fitted["rmd_q95"][n](o) for n, o in outs.items()}  # (B, N)
    c = torch.stack([conf["alpha"][:, -1], conf["beta"][:, -1]], dim=-1)  # (B, K)
    w = c.pow(power) / c.pow(power).sum(-1, keepdim=True)  # (B, K) wbar_k, written out
    assert (w[:, 0] - w[:, 1]).abs().max() > 0.1  # the weights matter on these texts
    index = [torch.tensor(space.teacher_to_global[n]) for n in ("alpha", "beta")]
    logits = [outs["alpha"].logits, outs["beta"].logits]
    target = union_target(logits, index, w, 4, cfg.temperature)
    with torch.no_grad():
        z_s = model.student.encode(TEXTS).logits
    torch.testing.assert_close(losses["kd"], kd_loss(z_s, target, cfg.temperature))
    for i, n in enumerate(("alpha", "beta")):  # the logged weights are the ones the target used
        torch.testing.assert_close(losses[f"kd_weight/{n}"], w[:, i].mean())
    other = union_target(logits, index, kd_teacher_weights(c, 9.0 - power), 4, cfg.temperature)  # 1 <-> 8
    assert abs(losses["kd"].item() - kd_loss(z_s, other, cfg.temperature).item()) > 1e-3  # the power matters
    uniform = union_target(logits, index, torch.ones(4, 2), 4, cfg.temperature)
    assert abs(losses["kd"].item() - kd_loss(z_s, uniform, cfg.temperature).item()) > 1e-3


def test_forward_returns_the_kd_weights_it_used(synthetic_task, teachers, fitted):
    """``kd_weights`` (B, K) are the last block's confidences through ``kd_confidence_power``; the step
    logs their batch means instead of computing them again."""
    cfg = AmalgamationConfig(amalg_dim=16, amalg_heads=2, kd_confidence_power=8.0)
    model = build(synthetic_task, teachers, cfg).eval()
    outs = run_teachers(teachers, TEXTS)
    conf = [fitted["rmd_q95"][n](outs[n]) for n in model.teacher_names]  # K x (B, N)
    out = model(**model.student.tokenize(TEXTS), teacher_states=[outs[n].block_states for n in model.teacher_names],
                teacher_logits=[outs[n].logits for n in model.teacher_names], confidences=conf)
    w = out["kd_weights"]
    assert w.shape == (len(TEXTS), 2) and not w.requires_grad
    torch.testing.assert_close(w, kd_teacher_weights(torch.stack([c[:, -1] for c in conf], -1), 8.0))
    losses = amalgamation_step(model, TEXTS, teacher_outputs=outs, estimators=fitted["rmd_q95"])
    assert "kd_weights" not in losses
    for i, n in enumerate(model.teacher_names):
        torch.testing.assert_close(losses[f"kd_weight/{n}"], w[:, i].mean())


def test_block_loss_centred_within_each_rows_most_confident_teacher(synthetic_task, teachers, fitted):
    """``center_block_loss_within: confident_teacher``: Eq. 7 is centred within the rows whose last-block
    confidence is highest for the same teacher."""
    from dfkd_ray.math.losses import block_loss

    outs = run_teachers(teachers, TEXTS)
    conf = [fitted["rmd"][n](outs[n]) for n in ("alpha", "beta")]  # K x (B, N)
    groups = torch.stack([c[:, -1] for c in conf], -1).argmax(-1)
    assert groups[:2].tolist() == [0, 0] and 1 in groups[2:].tolist()  # both groups in the batch
    losses = {}
    for within in ("batch", "confident_teacher"):
        model = build(synthetic_task, teachers, AmalgamationConfig(amalg_dim=16, amalg_heads=2,
                                                                   center_block_loss_within=within)).eval()
        with torch.no_grad():
            out = model(**model.student.tokenize(TEXTS), teacher_states=[outs[n].block_states for n in ("alpha", "beta")],
                        teacher_logits=[outs[n].logits for n in ("alpha", "beta")], confidences=conf)
            s = model.student.encode(TEXTS).projections
            a = model.fusion([outs[n].block_states for n in ("alpha", "beta")], conf)
        torch.testing.assert_close(out["block"], block_loss(s, a, center=True, groups=groups if within != "batch" else None))
        losses[within] = out["block"].item()
    assert abs(losses["batch"] - losses["confident_teacher"]) > 1e-3


def test_the_amalgamation_section_sets_the_loss(synthetic_task, teachers, fitted):
    """``train_fusion: false`` freezes ST-amalg (fixed targets); ``alpha``/``beta`` weigh Eq. 8."""
    frozen = build(synthetic_task, teachers, AmalgamationConfig(amalg_dim=16, amalg_heads=2, train_fusion=False,
                                                                alpha=0.5, beta=2.0))
    assert not any(p.requires_grad for p in frozen.fusion.parameters())
    losses = amalgamation_step(frozen, TEXTS, teachers=teachers, estimators=fitted["rmd"])
    assert losses["loss"].item() == pytest.approx(0.5 * losses["block"].item() + 2.0 * losses["kd"].item(), rel=1e-5)
    losses["loss"].backward()
    assert all(p.grad is None for p in frozen.fusion.parameters())
    assert all(p.grad is not None for p in frozen.student.proj.parameters())


def test_two_identical_teachers_make_the_kd_target_that_teachers_distribution(synthetic_task, teachers, heldout):
    alpha = teachers["alpha"]
    twins = {"a1": alpha, "a2": alpha}
    texts, classes = heldout
    ests = fit_estimators(twins, {"a1": texts["alpha"], "a2": texts["alpha"]},
                          {"a1": classes["alpha"], "a2": classes["alpha"]}, AmalgamationConfig(), seed=0)
    space = UnionLabelSpace.from_teachers({n: t.labels for n, t in twins.items()})
    assert space.names == tuple(alpha.labels)
    cfg = AmalgamationConfig(amalg_dim=16, amalg_heads=2)
    torch.manual_seed(0)
    student = Student.from_config(StudentConfig(path=synthetic_task.student, num_layers=3), labels=space.names,
                                  amalg_dim=16)
    model = Amalgamator.build(student, twins, space, cfg).eval()
    losses = amalgamation_step(model, TEXTS, teachers=twins, estimators=ests)
    with torch.no_grad():
        z_s = student.encode(TEXTS).logits
        p = F.softmax(alpha(TEXTS).logits / cfg.temperature, -1)  # the one teacher's distribution
    torch.testing.assert_close(losses["kd"], kd_loss(z_s, p, cfg.temperature))
    # and a student that reproduces it has zero KD loss
    assert kd_loss(cfg.temperature * p.log(), p, cfg.temperature).item() == pytest.approx(0.0, abs=1e-6)


def test_block_count_mismatch_between_teachers_and_student_is_an_error(synthetic_task, teachers, fitted):
    model = build(synthetic_task, teachers, AmalgamationConfig(amalg_dim=16, amalg_heads=2), num_layers=4)
    with pytest.raises(ValueError, match="num_blocks=4"):
        amalgamation_step(model, TEXTS, teachers=teachers, estimators=fitted["rmd"])


def test_step_input_errors(synthetic_task, teachers, fitted):
    model = build(synthetic_task, teachers, AmalgamationConfig(amalg_dim=16, amalg_heads=2))
    with pytest.raises(ValueError, match="either the loaded teachers"):
        amalgamation_step(model, TEXTS, estimators=fitted["rmd"])
    with pytest.raises(ValueError, match="confidence statistics"):
        amalgamation_step(model, TEXTS, teachers=teachers, estimators={"alpha": fitted["rmd"]["alpha"]})
    with pytest.raises(ValueError, match="empty batch"):
        amalgamation_step(model, [], teachers=teachers, estimators=fitted["rmd"])
    with pytest.raises(ValueError, match="'text' column"):
        amalgamation_step(model, {"txt": TEXTS}, teachers=teachers, estimators=fitted["rmd"])
    with pytest.raises(ValueError, match="K = 0"):
        Amalgamator(model.student, model.fusion, UnionLabelSpace.from_teachers({}), [], AmalgamationConfig())


def _ddp_steps(synthetic_task, teachers, estimators, pg_file: str) -> None:
    """Two amalgamation steps through a DDP wrapper (1 gloo rank); runs in a forked child, which exits
    without tearing anything down: see the test."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    try:
        dist.init_process_group("gloo", init_method=f"file://{pg_file}", rank=0, world_size=1)
        model = DistributedDataParallel(build(synthetic_task, teachers, AmalgamationConfig(amalg_dim=16, amalg_heads=2)))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for _ in range(2):
            losses = amalgamation_step(model, TEXTS, teachers=teachers, estimators=estimators)
            opt.zero_grad()
            losses["loss"].backward()
            opt.step()
        code = 0 if torch.isfinite(losses["loss"]) else 3
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def test_step_runs_under_ddp(synthetic_task, teachers, fitted, tmp_path):
    """The step calls the DDP wrapper's forward; two steps catch parameters that never get gradients.

    In a forked child with a deadline: torch 2.13's gloo process group can deadlock in its destructor
    (~ProcessGroupGloo on a mutex, pytorch/pytorch#75097), which once hung a whole CI run in this process
    where pytest-timeout's signal could not reach it. The child exits without destroying the group."""
    child = multiprocessing.get_context("fork").Process(
        target=_ddp_steps, args=(synthetic_task, teachers, fitted["rmd"], str(tmp_path / "pg")))
    child.start()
    child.join(timeout=240)
    if child.is_alive():
        child.kill()
        pytest.fail("the DDP steps did not finish in 240 s")
    assert child.exitcode == 0, f"DDP steps failed (exit {child.exitcode}; 3: non-finite loss); traceback above"


def test_kd_source_weight_moves_the_target_to_the_teacher_each_row_was_made_for(synthetic_task, teachers, fitted):
    """``kd_source_weight`` 1: each row's KD weights are its source teacher's one-hot, so the KD loss is
    against that teacher's distribution alone; without sources the step refuses, naming the field."""
    from dfkd_ray.math.amalgamation import with_source_teacher

    cfg = AmalgamationConfig(amalg_dim=16, amalg_heads=2, kd_source_weight=1.0)
    model = build(synthetic_task, teachers, cfg).eval()
    names = model.teacher_names
    outs = run_teachers(teachers, TEXTS)
    conf = [fitted["rmd"][n](outs[n]) for n in names]
    source = torch.tensor([0, 0, 1, 1])
    inputs = dict(teacher_states=[outs[n].block_states for n in names], teacher_logits=[outs[n].logits for n in names],
                  confidences=conf)
    out = model(**model.student.tokenize(TEXTS), **inputs, source_teachers=source)
    torch.testing.assert_close(out["kd_weights"], F.one_hot(source, 2).float())
    half = build(synthetic_task, teachers, cfg.model_copy(update={"kd_source_weight": 0.5})).eval()
    paper = build(synthetic_task, teachers, cfg.model_copy(update={"kd_source_weight": 0.0})).eval()
    w0 = paper(**paper.student.tokenize(TEXTS), **inputs)["kd_weights"]
    w_half = half(**half.student.tokenize(TEXTS), **inputs, source_teachers=source)["kd_weights"]
    torch.testing.assert_close(w_half, with_source_teacher(w0, source, 0.5))
    with pytest.raises(ValueError, match="kd_source_weight > 0 needs each row's source teacher"):
        model(**model.student.tokenize(TEXTS), **inputs)


def test_a_one_class_teacher_takes_its_kd_weight_by_elimination(synthetic_task, teachers, heldout, tmp_path):
    """A teacher fine-tuned on one class (a copy of beta with a one-label head: its softmax is 1 on every
    text) gets ``c_solo (1 - c_alpha)`` as its confidence in the step (``one_class_confidence:
    elimination``) and its own statistics alone with ``own``."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from dfkd_ray.models.teacher import Teacher

    solo_dir = tmp_path / "solo"
    src = synthetic_task.teachers["beta"]
    AutoModelForSequenceClassification.from_pretrained(src, num_labels=1, id2label={0: "space"}, label2id={"space": 0},
                                                       problem_type=None,
                                                       ignore_mismatched_sizes=True).save_pretrained(solo_dir)
    AutoTokenizer.from_pretrained(src).save_pretrained(solo_dir)
    pair = {"alpha": teachers["alpha"], "solo": Teacher.from_pretrained("solo", solo_dir, num_blocks=3)}
    texts, classes = heldout
    ests = fit_estimators(pair, {"alpha": texts["alpha"], "solo": texts["beta"]},
                          {"alpha": classes["alpha"], "solo": [0] * len(texts["beta"])}, AmalgamationConfig(), seed=0)
    assert ests["solo"].num_classes == 1
    outs = run_teachers(pair, TEXTS)
    c_alpha, c_solo = ests["alpha"](outs["alpha"])[:, -1], ests["solo"](outs["solo"])[:, -1]  # (B,)
    for rule, c in (("elimination", c_solo * (1 - c_alpha)), ("own", c_solo)):
        cfg = AmalgamationConfig(amalg_dim=16, amalg_heads=2, one_class_confidence=rule)
        losses = amalgamation_step(build(synthetic_task, pair, cfg), TEXTS, teacher_outputs=outs, estimators=ests)
        w = kd_teacher_weights(torch.stack([c_alpha, c], -1), cfg.kd_confidence_power)  # (B, 2)
        torch.testing.assert_close(losses["kd_weight/solo"], w[:, 1].mean())
