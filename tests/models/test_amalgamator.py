"""ST-amalg and its ablations (StrataNet Eq. 5-6, section 7.1.2), and the full amalgamation step with the
heterogeneous fixture teachers (alpha: BERT 2 layers x 32; beta: DistilBERT 3 layers x 48)."""

from __future__ import annotations

import multiprocessing
import os
import sys
import traceback

import pytest
import torch
import torch.nn.functional as F

from dfkd_ray.config import AmalgamationConfig
from dfkd_ray.labels import UnionLabelSpace
from dfkd_ray.math.amalgamation import BlockAmalgamation, normalized_weights
from dfkd_ray.math.losses import kd_loss

DIMS = (32, 48, 20)
N, D, B = 3, 16, 5


pytestmark = pytest.mark.usefixtures("seeded_single_thread")


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    states = [torch.randn(B, N, h, generator=g) for h in DIMS]  # K x (B, N, H_k)
    conf = [torch.rand(B, N, generator=g) for _ in DIMS]  # K x (B, N)
    return states, conf


# --------------------------------------------------------------------------------------------
# the module on hand-made tensors


@pytest.mark.parametrize("fusion", ["st", "mul", "no_st"])
@pytest.mark.parametrize("share", [False, True])
def test_shapes_with_heterogeneous_widths(fusion, share):
    m = BlockAmalgamation(DIMS, N, D, heads=4, fusion=fusion, share_layer=share)
    states, conf = inputs()
    out = m(states, conf)
    assert out.shape == (B, N, D) and torch.isfinite(out).all()


def test_share_layer_uses_one_transformer_layer():
    per_block = BlockAmalgamation(DIMS, N, D, fusion="st")
    shared = BlockAmalgamation(DIMS, N, D, fusion="st", share_layer=True)
    assert len(per_block.layers) == N and len(shared.layers) == 1
    assert shared.amalg_token.shape == (N, D)  # each block keeps its own [AMALG] token


def test_st_enriches_with_confidence_so_a_zero_confidence_teacher_still_speaks():
    m = BlockAmalgamation(DIMS, N, D, fusion="st").eval()
    states, conf = inputs()
    conf[1] = torch.zeros(B, N)
    changed = list(states)
    changed[1] = states[1] + 3.0 * torch.randn_like(states[1])
    assert not torch.allclose(m(states, conf), m(changed, conf))  # Eq. 5 adds c u, it does not gate
    other = [c.clone() for c in conf]
    other[0] = 1.0 - other[0]
    assert not torch.allclose(m(states, conf), m(states, other))  # confidence is an input


def test_mul_multiplies_so_a_zero_confidence_teacher_is_silenced():
    m = BlockAmalgamation(DIMS, N, D, fusion="mul").eval()
    assert not hasattr(m, "conf_embed")
    states, conf = inputs()
    conf[1] = torch.zeros(B, N)
    changed = list(states)
    changed[1] = states[1] + 3.0 * torch.randn_like(states[1])
    torch.testing.assert_close(m(states, conf), m(changed, conf))
    # and the token is exactly c * W LN(h): scaling one teacher's confidence changes the output
    half = [c.clone() for c in conf]
    half[0] = 0.5 * conf[0]
    assert not torch.allclose(m(states, conf), m(states, half))


def test_no_st_is_a_linear_layer_over_the_confidence_weighted_mean():
    m = BlockAmalgamation(DIMS, N, D, fusion="no_st").eval()
    assert not hasattr(m, "layers") and not hasattr(m, "amalg_token")
    states, conf = inputs()
    w = normalized_weights(torch.stack(conf, -1))  # (B, N, K)
    expected = torch.stack([
        m.out[b](sum(w[:, b, k:k + 1] * m.proj[b][k](F.layer_norm(states[k][:, b], (DIMS[k],)))
                     for k in range(len(DIMS))))
        for b in range(N)], dim=1)  # (B, N, D)
    torch.testing.assert_close(m(states, conf), expected)
    # the weights are normalised: scaling every confidence by the same factor changes nothing
    torch.testing.assert_close(m(states, [0.3 * c for c in conf]), expected)


def test_fusions_differ_on_the_same_inputs():
    states, conf = inputs()
    outs = {}
    for fusion in ("st", "mul", "no_st"):
        torch.manual_seed(0)
        outs[fusion] = BlockAmalgamation(DIMS, N, D, fusion=fusion).eval()(states, conf)
    assert not torch.allclose(outs["st"], outs["mul"]) and not torch.allclose(outs["mul"], outs["no_st"])


@pytest.mark.parametrize("fusion", ["st", "mul", "no_st"])
def test_gradients_reach_every_parameter_and_not_the_inputs(fusion):
    m = BlockAmalgamation(DIMS, N, D, fusion=fusion)
    states, conf = inputs()
    m(states, conf).pow(2).sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(h.grad is None and not h.requires_grad for h in states)


def test_bad_inputs_raise_clear_errors():
    m = BlockAmalgamation(DIMS, N, D)
    states, conf = inputs()
    with pytest.raises(ValueError, match="K = 0"):
        m([], [])
    with pytest.raises(ValueError, match="K = 0"):
        BlockAmalgamation([], N, D)
    with pytest.raises(ValueError, match="confidences of 2"):
        m(states, conf[:2])
    with pytest.raises(ValueError, match="built for 3 teachers"):
        m(states[:2], conf[:2])
    with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
        m(states, [conf[0] + 1.5] + conf[1:])
    with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
        m(states, [conf[0] * float("nan")] + conf[1:])
    with pytest.raises(ValueError, match="hidden size 33"):
        m([torch.randn(B, N, 33)] + states[1:], conf)
    with pytest.raises(ValueError, match="disagree"):
        m([states[0], torch.randn(B, N + 1, DIMS[1]), states[2]], conf)
    with pytest.raises(ValueError, match="N = 4 blocks"):
        m([torch.randn(B, 4, h) for h in DIMS], [torch.rand(B, 4) for _ in DIMS])
    with pytest.raises(ValueError, match=r"\(B, N\)"):
        m(states, [torch.rand(B, N + 1)] + conf[1:])
    with pytest.raises(ValueError, match="unknown fusion"):
        BlockAmalgamation(DIMS, N, D, fusion="concat")
    with pytest.raises(ValueError, match="divisible"):
        BlockAmalgamation(DIMS, N, 18, heads=4)


def test_kd_teacher_weights_power_properties():
    from dfkd_ray.math.amalgamation import kd_teacher_weights

    c = torch.tensor([[0.84, 0.60, 0.10], [0.2, 0.2, 0.2], [0.0, 0.0, 0.0], [0.0, 0.5, 0.0], [1e-30, 1e-31, 0.0]])
    torch.testing.assert_close(kd_teacher_weights(c, 1.0), normalized_weights(c))  # proportional (the paper)
    torch.testing.assert_close(kd_teacher_weights(c, 0.0), torch.full_like(c, 1 / 3))  # uniform mix
    for power in (0.5, 2.0, 8.0, 1000.0):
        w = kd_teacher_weights(c, power)
        assert torch.isfinite(w).all() and (w >= 0).all()
        torch.testing.assert_close(w.sum(-1), torch.ones(len(c)))
        ref = c[0].double() ** power / (c[0].double() ** power).sum()  # float64: 0.84^1000 ~ 1e-76
        torch.testing.assert_close(w[0], ref.float(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(w[1:3], torch.full((2, 3), 1 / 3))  # ties and all-zero rows: uniform
        torch.testing.assert_close(w[3], torch.tensor([0.0, 1.0, 0.0]))
    # sharper with the power, and the top teacher alone in the limit (no underflow to an all-zero row)
    tops = [kd_teacher_weights(c, p)[0, 0].item() for p in (1.0, 2.0, 8.0, 1000.0)]
    assert tops == sorted(tops) and tops[-1] == pytest.approx(1.0)
    assert kd_teacher_weights(c, 8.0)[0, 1].item() == pytest.approx(0.0635, abs=1e-3)  # the docstring's example
    assert kd_teacher_weights(c, 1000.0)[4].argmax().item() == 0  # tiny confidences still order the teachers
    with pytest.raises(ValueError, match="power"):
        kd_teacher_weights(c, -1.0)
    with pytest.raises(ValueError, match=r"\(B, K\)"):
        kd_teacher_weights(c[0], 2.0)


# --------------------------------------------------------------------------------------------
# the whole step with real heterogeneous teachers


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
    from dfkd_ray.models.amalgamator import fit_estimators

    texts, classes = heldout
    fits = {m: fit_estimators(teachers, texts, classes, cfg=AmalgamationConfig(confidence=m)) for m in ("rmd", "md", "msp")}
    # centred lower, so that the two teachers' confidences differ on TEXTS at gamma 1 (the golden KD check)
    fits["rmd_q95"] = fit_estimators(teachers, texts, classes, cfg=AmalgamationConfig(confidence_center="quantile",
                                                                                     confidence_quantile=0.95))
    return fits


def build(synthetic_task, teachers, cfg: AmalgamationConfig, num_layers: int = 3):
    from dfkd_ray.models.amalgamator import Amalgamator
    from dfkd_ray.models.student import Student

    torch.manual_seed(0)
    space = UnionLabelSpace.from_teachers({n: t.labels for n, t in teachers.items()})
    student = Student.from_pretrained(synthetic_task.student, labels=space.names, amalg_dim=cfg.amalg_dim,
                                      num_layers=num_layers)
    return Amalgamator.build(student, teachers, space, cfg)


@pytest.mark.parametrize("confidence", ["rmd", "md", "msp"])
@pytest.mark.parametrize("fusion", ["st", "mul", "no_st"])
def test_step_shapes_and_finite_losses(synthetic_task, teachers, fitted, confidence, fusion):
    from dfkd_ray.models.amalgamator import amalgamation_step

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


def test_fit_estimators_fits_each_rmd_background_on_every_teachers_heldout_texts(teachers, heldout, fitted):
    """rmd_background all_teachers (default): teacher k's background Gaussian uses its own features of
    all teachers' held-out texts; own: its texts only; md has none."""
    from dfkd_ray.math.confidence import fit_gaussians
    from dfkd_ray.models.amalgamator import collect_outputs, fit_estimators

    texts, classes = heldout
    own = fit_estimators(teachers, texts, classes, cfg=AmalgamationConfig(rmd_background="own"))
    for name, teacher in teachers.items():
        others = [t for n in teachers if n != name for t in texts[n]]
        assert fitted["rmd"][name].meta["num_background"] == len(others) > 0
        assert own[name].meta["num_background"] == fitted["md"][name].meta["num_background"] == 0
        states, _ = collect_outputs(teacher, texts[name] + others)  # (M + M_o, N, H)
        m = len(texts[name])
        b = states.shape[1] - 1
        ref = fit_gaussians(states[:m, b], torch.tensor(classes[name]), len(teacher.labels), 0.1,
                            background=states[:, b])
        torch.testing.assert_close(fitted["rmd"][name].tensors["bg_mean"][b], ref["bg_mean"])
        torch.testing.assert_close(own[name].tensors["precision"][b], fitted["rmd"][name].tensors["precision"][b])


def test_rmd_weights_each_teacher_up_on_its_own_topics(synthetic_task, teachers, fitted):
    """A teacher's KD weight and confidence are higher on its own topics than on the other teacher's.

    Compared across topics rather than against fixed levels: the synthetic teachers are trained at
    fixture build time and their exact confidences vary between builds (thread counts).
    """
    from dfkd_ray.models.amalgamator import amalgamation_step
    from dfkd_ray.synthetic import TEACHER_TOPICS, labelled_sentences

    model = build(synthetic_task, teachers, AmalgamationConfig(amalg_dim=16, amalg_heads=2))
    on = {owner: amalgamation_step(model, [t for t, _ in labelled_sentences(10, seed=300, topics=topics)],
                                   teachers=teachers, estimators=fitted["rmd"])
          for owner, topics in TEACHER_TOPICS.items()}
    for k, other in (("alpha", "beta"), ("beta", "alpha")):
        assert on[k][f"kd_weight/{k}"].item() > on[other][f"kd_weight/{k}"].item() + 0.3
        assert on[k][f"confidence/{k}"].item() > on[k][f"confidence/{other}"].item() + 0.3


def test_step_gradients_reach_student_projections_and_fusion_never_teachers(synthetic_task, teachers, fitted):
    from dfkd_ray.models.amalgamator import amalgamation_step, run_teachers

    model = build(synthetic_task, teachers, AmalgamationConfig(amalg_dim=16, amalg_heads=2))
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
    from dfkd_ray.models.amalgamator import amalgamation_step, run_teachers

    model = build(synthetic_task, teachers, AmalgamationConfig(amalg_dim=16, amalg_heads=2)).eval()
    a = amalgamation_step(model, {"text": TEXTS}, teachers=teachers, estimators=fitted["rmd"])
    b = amalgamation_step(model, TEXTS, teacher_outputs=run_teachers(teachers, TEXTS), estimators=fitted["rmd"])
    for k in a:
        torch.testing.assert_close(a[k], b[k])


@pytest.mark.parametrize("power", [1.0, 8.0])
def test_step_kd_is_against_the_confidence_weighted_union_target(synthetic_task, teachers, fitted, power):
    """Golden check of the KD term with heterogeneous teachers: weights are the last block's c_k^N raised
    to ``kd_confidence_power`` and normalised."""
    from dfkd_ray.math.amalgamation import kd_teacher_weights
    from dfkd_ray.math.losses import union_target
    from dfkd_ray.models.amalgamator import amalgamation_step, run_teachers

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


def test_two_identical_teachers_make_the_kd_target_that_teachers_distribution(synthetic_task, teachers, heldout):
    from dfkd_ray.models.amalgamator import Amalgamator, amalgamation_step, fit_estimators
    from dfkd_ray.models.student import Student

    alpha = teachers["alpha"]
    twins = {"a1": alpha, "a2": alpha}
    texts, classes = heldout
    ests = fit_estimators(twins, {"a1": texts["alpha"], "a2": texts["alpha"]},
                          {"a1": classes["alpha"], "a2": classes["alpha"]})
    space = UnionLabelSpace.from_teachers({n: t.labels for n, t in twins.items()})
    assert space.names == tuple(alpha.labels)
    cfg = AmalgamationConfig(amalg_dim=16, amalg_heads=2)
    torch.manual_seed(0)
    student = Student.from_pretrained(synthetic_task.student, labels=space.names, amalg_dim=16, num_layers=3)
    model = Amalgamator.build(student, twins, space, cfg).eval()
    losses = amalgamation_step(model, TEXTS, teachers=twins, estimators=ests)
    with torch.no_grad():
        z_s = student.encode(TEXTS).logits
        p = F.softmax(alpha(TEXTS).logits / cfg.temperature, -1)  # the one teacher's distribution
    torch.testing.assert_close(losses["kd"], kd_loss(z_s, p, cfg.temperature))
    # and a student that reproduces it has zero KD loss
    assert kd_loss(cfg.temperature * p.log(), p, cfg.temperature).item() == pytest.approx(0.0, abs=1e-6)


def test_block_count_mismatch_between_teachers_and_student_is_an_error(synthetic_task, teachers, fitted):
    from dfkd_ray.models.amalgamator import amalgamation_step

    model = build(synthetic_task, teachers, AmalgamationConfig(amalg_dim=16, amalg_heads=2), num_layers=4)
    with pytest.raises(ValueError, match="num_blocks=4"):
        amalgamation_step(model, TEXTS, teachers=teachers, estimators=fitted["rmd"])


def test_step_input_errors(synthetic_task, teachers, fitted):
    from dfkd_ray.models.amalgamator import Amalgamator, amalgamation_step

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
        Amalgamator(model.student, model.fusion, UnionLabelSpace.from_teachers({}), [])


def _ddp_steps(synthetic_task, teachers, estimators, pg_file: str) -> None:
    """Two amalgamation steps through a DDP wrapper (1 gloo rank); runs in a forked child, which exits
    without tearing anything down: see the test."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from dfkd_ray.models.amalgamator import amalgamation_step

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
