"""The metrics log of a run: JSON lines, resume, loss curves."""

from __future__ import annotations

from dfkd_ray.train.metrics import MetricsLog


def test_metrics_log_drops_lines_after_the_resumed_checkpoint(tmp_path):
    log = MetricsLog(tmp_path / "m.jsonl")
    for step in (2, 4, 6, 8):
        log.write({"step": step, "loss": 1.0 / step})
    log = MetricsLog(tmp_path / "m.jsonl", resume_step=4)
    assert [r["step"] for r in log.read()] == [2, 4]
    log.write({"step": 6, "loss": 0.1})
    assert log.plot(tmp_path / "c.png").stat().st_size > 5_000
