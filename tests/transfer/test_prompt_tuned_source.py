"""The 'prompt_tuned' transfer source (DFKD-T3): its config checks, a set written in one process, prompt files."""

from __future__ import annotations

import copy
import json
import shutil

import pytest

from dfkd_ray.config import ConfigError

pytestmark = pytest.mark.usefixtures("seeded_single_thread")


def _job(job_dict, synthetic_task, tmp_path, **prompt_tuned):
    d = copy.deepcopy(job_dict)
    d["transfer"] = {"source": "prompt_tuned", "samples_per_class": 3, "shard_size": 6, "max_attempts": 2,
                     "corpus": {"path": str(synthetic_task.corpus)},
                     "prompt_tuned": {"lm_path": str(synthetic_task.lm), "tuning_steps": 2, "tuning_batch_size": 4,
                                      "max_new_tokens": 8, "max_source_tokens": 12, **prompt_tuned}}
    d["output"] = {"dir": str(tmp_path / "out")}
    return d


def _problems(d) -> dict[str, str]:
    from dfkd_ray.preflight import check_config

    with pytest.raises(ConfigError) as err:
        check_config(d)
    return dict(err.value.problems)


def test_bad_settings_are_refused_at_config_time_with_the_field_and_the_fix(job_dict, synthetic_task, tmp_path):
    d = _job(job_dict, synthetic_task, tmp_path, num_soft_tokens=0, stable_level=0.0)
    del d["transfer"]["corpus"]
    problems = _problems(d)
    assert set(problems) == {"transfer.corpus.path", "transfer.prompt_tuned.num_soft_tokens",
                             "transfer.prompt_tuned.stable_level"}, problems
    assert "needs transfer.corpus.path" in problems["transfer.corpus.path"]
    assert "at least one trainable soft vector" in problems["transfer.prompt_tuned.num_soft_tokens"]
    assert "must be > 0" in problems["transfer.prompt_tuned.stable_level"]
    assert "transfer.prompt_tuned.stable_level" in _problems(_job(job_dict, synthetic_task, tmp_path, stable_level=-5))
    problems = _problems(_job(job_dict, synthetic_task, tmp_path, specificity_weight=0, diversity_weight=0,
                              min_new_tokens=9))
    assert set(problems) == {"transfer.prompt_tuned.diversity_weight", "transfer.prompt_tuned.min_new_tokens"}
    assert "would not be tuned" in problems["transfer.prompt_tuned.diversity_weight"]
    d = _job(job_dict, synthetic_task, tmp_path)
    d["transfer"]["corpus"]["path"] = str(tmp_path / "missing.txt")
    del d["transfer"]["prompt_tuned"]["lm_path"]
    problems = _problems(d)
    assert set(problems) == {"transfer.corpus.path", "transfer.prompt_tuned.lm_path"}, problems
    assert "does not exist" in problems["transfer.corpus.path"]
    empty = tmp_path / "short.txt"
    empty.write_text("two words\n")
    d = _job(job_dict, synthetic_task, tmp_path)
    d["transfer"]["corpus"]["path"] = str(empty)
    assert "no line with >= 4 words" in _problems(d)["transfer.corpus.path"]


def test_an_lm_that_cannot_rewrite_is_refused(job_dict, synthetic_task, tmp_path):
    seq2seq = tmp_path / "t5"
    shutil.copytree(synthetic_task.lm, seq2seq)
    config = json.loads((seq2seq / "config.json").read_text())
    (seq2seq / "config.json").write_text(json.dumps({**config, "is_encoder_decoder": True}))
    problems = _problems(_job(job_dict, synthetic_task, tmp_path, lm_path=str(seq2seq)))
    assert "decoder-only" in problems["transfer.prompt_tuned.lm_path"], problems
    problems = _problems(_job(job_dict, synthetic_task, tmp_path, max_source_tokens=100, max_new_tokens=20))
    assert "more than the LM's context (128)" in problems["transfer.prompt_tuned.max_source_tokens"], problems


def test_a_commander_in_pieces_is_allowed_and_said_once(job_dict, synthetic_task, tmp_path, capsys):
    from dfkd_ray.preflight import check_config

    cfg = check_config(_job(job_dict, synthetic_task, tmp_path))  # 'summarize': six pieces of the fixture LM's BPE
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "'summarize' is 6 pieces" in notes[0], notes
    assert cfg.transfer.prompt_tuned.commander == "summarize"
    check_config(_job(job_dict, synthetic_task, tmp_path, commander="goal"))  # one token: nothing to say
    assert "note:" not in capsys.readouterr().out


def test_prompt_tuned_source_writes_a_transfer_set(job_dict, synthetic_task, tmp_path):
    from dfkd_ray.config import validate_config
    from dfkd_ray.generation.prompt_tuning import file_digest, prompt_file, write_prompts
    from dfkd_ray.stages import read_record
    from dfkd_ray.transfer.store import read_transfer_table
    from dfkd_ray.transfer.writer import write_transfer_set

    cfg = validate_config(_job(job_dict, synthetic_task, tmp_path))
    with pytest.raises(FileNotFoundError, match=r"no tuned prompts for teachers \['alpha', 'beta'\]"):
        write_transfer_set(cfg, tmp_path / "early", progress=False)
    directory = write_prompts(cfg)
    assert set(read_record(directory)["teachers"]) == {"alpha", "beta"}
    table = read_transfer_table(write_transfer_set(cfg, progress=False))
    assert table.num_rows == 12 and set(table.column("source").to_pylist()) == {"prompt_tuned"}
    digests = {t: file_digest(prompt_file(cfg, t)) for t in ("alpha", "beta")}
    for row in table.to_pylist():
        params = json.loads(row["source_params"])
        assert params["commander"] == "summarize" and params["stable_level"] == 1.0
        assert params["prompt_digest"] == digests[row["teacher"]]
        assert isinstance(params["document"], int) and params["stop"] in ("eos", "length")
        assert row["sample_id"].split("/")[1] == str(row["teacher_class"])  # targeted: the request's class
    again = read_transfer_table(write_transfer_set(cfg, tmp_path / "again", progress=False))
    assert again.column("text").to_pylist() == table.column("text").to_pylist()


def test_changed_tuning_settings_are_refused_and_generation_settings_keep_the_prompts(job_dict, synthetic_task,
                                                                                      tmp_path):
    from dfkd_ray.config import validate_config
    from dfkd_ray.generation.prompt_tuning import finished_prompt, write_prompts
    from dfkd_ray.stages import StageMismatch

    write_prompts(validate_config(_job(job_dict, synthetic_task, tmp_path, tuning_steps=1)))
    assert finished_prompt(validate_config(_job(job_dict, synthetic_task, tmp_path, tuning_steps=1, batch_size=3)),
                           "alpha")["steps"] == 1
    changed = validate_config(_job(job_dict, synthetic_task, tmp_path, tuning_steps=1, learning_rate=0.5))
    with pytest.raises(StageMismatch, match=r"prompt_tuned.learning_rate: 0.01 -> 0.5"):
        write_prompts(changed)
