"""AS-DFD inside training (no Ray): construction toward the targets, the adversarial module, a short
run against random Gaussian embeddings, resume, confidence on crafted samples, and bad input."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from dfkd_ray.config import ConfigError, validate_config
from dfkd_ray.evaluation import evaluate_student, load_labelled
from dfkd_ray.train.embedding_guessing import (Crafter, EmbeddingGuessingDistiller, crafting_plan, crafting_requests,
                                               fit_crafted_confidence, request_batches, train_embedding_guessing)
from dfkd_ray.train.epochs import iterate_epochs

pytestmark = pytest.mark.usefixtures("seeded_single_thread")


@pytest.fixture(scope="module")
def gamma(synthetic_task):
    """Teacher gamma (space/finance), in teacher alpha's input-embedding space."""
    from dfkd_ray.synthetic import build_shared_embedding_teacher

    return build_shared_embedding_teacher(synthetic_task.root)


@pytest.fixture(scope="module")
def shared_teachers(synthetic_task, gamma):
    """alpha and gamma, loaded with the depth of a 2-layer student (N = 2 blocks)."""
    from dfkd_ray.models.teacher import Teacher

    return {"alpha": Teacher.from_pretrained("alpha", synthetic_task.teachers["alpha"], num_blocks=2),
            "gamma": Teacher.from_pretrained("gamma", gamma, num_blocks=2)}


@pytest.fixture
def eg_dict(job_dict, synthetic_task, gamma):
    """A small AS-DFD job over alpha and gamma; the student starts from alpha's layers, as in the paper."""
    d = copy.deepcopy(job_dict)
    d["teachers"] = [{"name": "alpha", "path": str(synthetic_task.teachers["alpha"])},
                     {"name": "gamma", "path": str(gamma)}]
    d["transfer"] = {"source": "embedding_guessing", "samples_per_class": 24, "heldout_fraction": 0.34,
                     "embedding_guessing": {"length": 16, "min_length": 5}}
    d["amalgamation"] = {"method": "vanilla", "temperature": 1.0}
    d["student"] = {"path": str(synthetic_task.teachers["alpha"])}
    d["train"] = {"epochs": 2, "warmup_epochs": 0, "batch_size": 16, "learning_rate": 1e-3,
                  "checkpoint_every_steps": 2}
    return d


def _samples(cfg, n: int = 16):
    return next(request_batches(crafting_requests(cfg, heldout=False), cfg, 0, batch_size=n))


def _target_probability(crafter: Crafter, crafted) -> torch.Tensor:
    from dfkd_ray.models.embedding_student import teacher_on_embeddings

    probs = torch.zeros(len(crafted.targets))
    with torch.no_grad():
        for k, name in enumerate(crafter.names):
            rows = (crafted.owner == k).nonzero().squeeze(1)
            out, _ = teacher_on_embeddings(crafter.teachers[name], crafted.embeds[rows],
                                           crafted.attention_mask[rows], with_states=False)
            probs[rows] = out.logits.softmax(-1).gather(1, crafted.targets[rows, None]).squeeze(1)
    return probs


def test_teacher_steps_make_the_teachers_assign_their_targets(eg_dict, shared_teachers):
    """After n_T steps (Eq. 2) each teacher gives its crafted samples their target class with high
    probability, far above the Gaussian starting points."""
    cfg = validate_config(eg_dict)
    samples = _samples(cfg)
    assert {p.teacher for p in samples} == {"alpha", "gamma"}
    noise = Crafter(shared_teachers, cfg.transfer.embedding_guessing.model_copy(update={"rounds": 0}))
    guessed = Crafter(shared_teachers, cfg.transfer.embedding_guessing.model_copy(
        update={"rounds": 1, "teacher_steps": 25, "adversarial_steps": 0}))
    before, after = _target_probability(noise, noise.craft(samples)), _target_probability(guessed, guessed.craft(samples))
    assert after.mean() > 0.9 and after.mean() - before.mean() > 0.3, (before, after)
    assert guessed.craft(samples).hit >= 0.9


def test_adversarial_steps_raise_l_mask_and_distillation_lowers_it(eg_dict, shared_teachers):
    """The n_S steps raise the student's masked-embedding loss (Eq. 3) on the crafted batch; the
    distillation steps, which train W on the batch, lower it."""
    eg_dict["train"]["learning_rate"] = 1e-2  # W moves visibly within a few steps
    cfg = validate_config(eg_dict)
    d = EmbeddingGuessingDistiller(cfg, crafting_plan(cfg), teachers=shared_teachers)
    samples = _samples(cfg)
    settings = cfg.transfer.embedding_guessing.model_copy(update={"rounds": 1, "teacher_steps": 2})
    plain = Crafter(shared_teachers, settings.model_copy(update={"adversarial_steps": 0})).craft(samples, d.module)
    harder = Crafter(shared_teachers, settings.model_copy(update={"adversarial_steps": 10})).craft(samples, d.module)

    def l_mask(crafted, seeds=range(4)) -> float:  # mean over draws of the masked positions
        d.module.eval()
        with torch.no_grad():
            return sum(d.crafter.mask_loss(d.module, crafted, torch.Generator().manual_seed(i)).item()
                       for i in seeds) / len(seeds)

    assert l_mask(harder) > l_mask(plain) + 0.05, (l_mask(plain), l_mask(harder))
    distilled = [harder.seed]  # the masked positions the distillation stage draws for this batch
    before = l_mask(harder, distilled)
    d.craft = lambda samples: harder  # distil on this very batch
    for _ in range(4):
        d.step(samples)
    assert l_mask(harder, distilled) < before - 0.1, (before, l_mask(harder, distilled))


def _accuracy(distiller, synthetic_task) -> float:
    texts, labels = load_labelled(synthetic_task.eval_file, label_space=distiller.space)
    return evaluate_student(distiller.student, texts, labels, distiller.space, 64)["accuracy"]


def test_short_run_beats_random_gaussian_embeddings(eg_dict, shared_teachers, synthetic_task, tmp_path):
    """The same budget on pseudo-embeddings crafted by the teachers and on random Gaussian
    embeddings (no construction, the ablation's first row): crafting wins on the labelled eval
    set. The exported student is an ordinary classifier over the union labels that reads text
    through the teacher's embedding layer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    eg_dict["train"]["epochs"] = 4
    cfg = validate_config(eg_dict)
    crafted, last = train_embedding_guessing(cfg, teachers=shared_teachers)
    noise_cfg = validate_config({**eg_dict, "transfer": {**eg_dict["transfer"], "embedding_guessing": {
        **eg_dict["transfer"]["embedding_guessing"], "rounds": 0}}})
    noise, _ = train_embedding_guessing(noise_cfg, teachers=shared_teachers)
    assert crafted.step_count == noise.step_count == crafted.plan.total_steps
    assert last["hit"] > 0.9 and set(last) >= {"kd", "pt", "mask", "agreement"}
    acc, acc_noise = _accuracy(crafted, synthetic_task), _accuracy(noise, synthetic_task)
    assert acc - acc_noise >= 0.15, (acc, acc_noise)

    out = crafted.export(tmp_path / "student")
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert list(model.config.id2label.values()) == ["sports", "cooking", "space", "finance"]
    teacher = shared_teachers["alpha"].model.get_input_embeddings().weight
    assert torch.equal(model.get_input_embeddings().weight, teacher)
    assert AutoTokenizer.from_pretrained(out).get_vocab() == shared_teachers["alpha"].tokenizer.get_vocab()


def test_a_resumed_run_crafts_the_batches_the_killed_one_would_have(eg_dict, shared_teachers, tmp_path):
    """A checkpoint mid-epoch holds the student, W, optimiser and position; a new worker restored from
    it continues with the same pseudo-samples (seeded by request and epoch), not from step 0, and
    ends at the plan's last step."""
    cfg = validate_config(eg_dict)
    plan = crafting_plan(cfg)
    requests = crafting_requests(cfg, heldout=False)
    epoch_batches = lambda epoch: request_batches(requests, cfg, epoch)  # noqa: E731
    first = EmbeddingGuessingDistiller(cfg, plan, teachers=shared_teachers)
    seen = []
    for epoch, index, batch in iterate_epochs(epoch_batches, plan):
        seen.append(batch)
        if len(seen) == 3:
            first.step(batch)
            first.save_checkpoint(tmp_path / "ckpt", epoch=epoch, batch=index + 1)
            break
        first.step(batch)
    starts = first.crafter.start(seen[-1])[0]
    resumed = EmbeddingGuessingDistiller(cfg, plan, teachers=shared_teachers)
    state = resumed.load_checkpoint(tmp_path / "ckpt")
    assert state["step"] == 3 and resumed.step_count == 3
    assert torch.equal(resumed.module.mask_head.weight, first.module.mask_head.weight)
    rest = list(iterate_epochs(epoch_batches, plan, start_epoch=state["epoch"], skip_batches=state["batch"]))
    assert len(rest) == plan.total_steps - 3
    uninterrupted = [b for _, _, b in iterate_epochs(epoch_batches, plan)]
    assert [b for _, _, b in rest] == uninterrupted[3:]
    assert torch.equal(resumed.crafter.start(uninterrupted[2])[0], starts)
    for _, _, batch in rest:
        metrics = resumed.step(batch)
    assert metrics["step"] == plan.total_steps and torch.isfinite(torch.tensor(metrics["loss"]))


def test_stratanet_weights_teachers_by_confidence_fitted_on_crafted_samples(eg_dict, shared_teachers):
    """amalgamation.method stratanet: each teacher's confidence statistics come from its block
    features of its own held-out pseudo-samples; the KD target of a step is their weighted mixture."""
    eg_dict["amalgamation"] = {"method": "stratanet", "confidence": "rmd", "calibration_folds": 2}
    eg_dict["student"]["num_layers"] = 2
    cfg = validate_config(eg_dict)
    estimators = fit_crafted_confidence(cfg, shared_teachers)
    assert set(estimators) == {"alpha", "gamma"}
    held = crafting_requests(cfg, heldout=True)
    assert estimators["gamma"].meta["num_samples"] == sum(r.teacher == "gamma" for r in held)
    d = EmbeddingGuessingDistiller(cfg, crafting_plan(cfg), teachers=shared_teachers, estimators=estimators)
    m = d.step(_samples(cfg))
    assert m["kd_weight/alpha"] + m["kd_weight/gamma"] == pytest.approx(1.0, abs=1e-5)
    assert 0 <= m["confidence/alpha"] <= 1 and m["loss"] > 0


def test_bad_input_is_refused_before_training(eg_dict, synthetic_task, tmp_path):
    """Teachers of two input-embedding spaces (another tokenizer and width; one tokenizer but embedding
    layers trained apart), students that cannot hold the teacher's embedding layer (another width; a
    Perceiver), sigma <= 0, too few held-out requests: each named at its field before training."""
    from transformers import PerceiverConfig

    from dfkd_ray.preflight import check_config

    d = copy.deepcopy(eg_dict)
    d["teachers"][1] = {"name": "beta", "path": str(synthetic_task.teachers["beta"])}  # BPE tokenizer, 48 wide
    d["student"] = {"path": str(synthetic_task.teachers["beta"])}
    d["transfer"]["embedding_guessing"]["sigma"] = 0
    with pytest.raises(ConfigError) as err:
        check_config(d)
    problems = dict(err.value.problems)
    assert "greater than 0" in problems.pop("transfer.embedding_guessing.sigma")
    assert "another input-embedding space" in problems["teachers[1].path"]
    assert "tokenizer differs from teacher 'alpha'" in problems.pop("teachers[1].path")
    assert "cannot hold it" in problems.pop("student.path") and not problems

    perceiver = tmp_path / "perceiver"
    PerceiverConfig(num_labels=4).save_pretrained(perceiver)
    d = copy.deepcopy(eg_dict)
    d["student"] = {"path": str(perceiver)}
    d["amalgamation"] = {"method": "stratanet"}
    d["transfer"]["heldout_fraction"] = 0.05
    with pytest.raises(ConfigError) as err:
        check_config(d)
    problems = dict(err.value.problems)
    assert "cannot hold it" in problems.pop("student.path")  # a Perceiver's "embeddings" are its latents
    assert "too few to fit the confidence statistics" in problems.pop("transfer.heldout_fraction")
    assert not problems

    apart = tmp_path / "gamma_apart"  # gamma's tokenizer and shapes, word embeddings trained apart
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(d["teachers"][1]["path"])
    torch.nn.init.normal_(model.get_input_embeddings().weight, std=0.05)
    model.save_pretrained(apart)
    AutoTokenizer.from_pretrained(d["teachers"][1]["path"]).save_pretrained(apart)
    d = copy.deepcopy(eg_dict)
    d["teachers"][1]["path"] = str(apart)
    with pytest.raises(ConfigError) as err:
        check_config(d)
    problems = dict(err.value.problems)
    assert list(problems) == ["teachers[1].path"] and "other weights there" in problems["teachers[1].path"]
    assert json.loads((apart / "config.json").read_text())["id2label"]


@pytest.mark.ray
@pytest.mark.slow
def test_the_job_runs_on_ray_with_no_text(ray_local, synthetic_task, gamma, tmp_path):
    """``jobs/configs/smoke_embedding_guessing.yaml`` through ``run_amalgamate`` on two Ray Train
    workers (DDP): the transfer-set stage records no text, each worker crafts its batches, and the
    exported student is evaluated like any other; a rerun skips every stage. Resume after a kill is
    the Ray loop's, shared with text sources (tests/orchestration/test_amalgamate.py); what crafting
    adds to it is tested without Ray above. The preset's stratanet confidence stage is the in-process
    fit of the stratanet test inside a Ray task; vanilla keeps this test short."""
    from transformers import pipeline

    from dfkd_ray.config import load_config
    from dfkd_ray.orchestration.amalgamate import run_amalgamate
    from dfkd_ray.preflight import preflight
    from dfkd_ray.transfer.store import read_manifest

    task, out = synthetic_task, tmp_path / "out"
    cfg = preflight(load_config(Path(__file__).parents[2] / "jobs" / "configs" / "smoke_embedding_guessing.yaml", [
        f"demo={task.root}", f"teachers.0.path={task.teachers['alpha']}", f"teachers.1.path={gamma}",
        f"student.path={task.teachers['alpha']}", f"eval.path={task.eval_file}", f"output.dir={out}",
        "transfer.samples_per_class=16", "transfer.heldout_fraction=0.5", "transfer.embedding_guessing.length=12",
        "transfer.embedding_guessing.rounds=1", "transfer.embedding_guessing.teacher_steps=3", "train.epochs=1",
        "train.batch_size=4", "train.report_every_steps=1", "train.checkpoint_every_steps=2",
        "amalgamation.method=vanilla"]))
    summary = run_amalgamate(cfg, progress=False)
    manifest = read_manifest(out / "transfer_set")
    assert manifest["complete"] and manifest["summary"]["text"] is False and not manifest["shards"]
    rows = [json.loads(x) for x in (out / "distill" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == summary["steps"] == crafting_plan(cfg, 2).total_steps >= 3
    assert all(0 <= r["hit"] <= 1 and r["pt"] >= 0 for r in rows)
    assert 0 <= summary["eval"]["student"]["accuracy"] <= 1 and summary["outputs"]["confidence"] is None
    clf = pipeline("text-classification", model=str(out / "student"), tokenizer=str(out / "student"))
    assert clf("the striker scored a goal")[0]["label"] in {"sports", "cooking", "space", "finance"}
    again = run_amalgamate(cfg, progress=False)
    assert again["eval"]["student"] == summary["eval"]["student"]
