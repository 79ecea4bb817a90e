"""The transfer-set summary figure: what ``summary.png`` shows."""

from __future__ import annotations

import pyarrow as pa

from dfkd_ray.transfer.summary import SummaryAccumulator, plot_summary, summary_figure


def _summary(confidences: list[float]) -> dict:
    n = len(confidences)
    acc = SummaryAccumulator()
    acc.add(pa.table({"teacher": ["alpha"] * n, "label_name": ["sports", "cooking"] * (n // 2),
                      "confidence": confidences, "num_tokens": [8 + i % 5 for i in range(n)],
                      "text": [f"the match {i} ended" for i in range(n)]}))
    summary = acc.result()
    summary.update({"rejects": {"low_confidence": 7, "duplicate": 2}, "requests": n + 9, "given_up": 0,
                    "samples_per_s": 12.5, "source": "steered"})
    return summary


def _axis(fig, word: str):
    (ax,) = [a for a in fig.axes if word in a.get_title()]
    return ax


def test_figure_shows_rejects_by_reason_and_samples_per_second():
    fig = summary_figure(_summary([0.6 + 0.01 * i for i in range(40)]))
    rejects = _axis(fig, "rejects")
    labels = [t.get_text() for t in rejects.get_xticklabels()]
    heights = dict(zip(labels, (p.get_height() for p in rejects.patches)))
    assert heights == {"duplicate": 2, "low_confidence": 7}
    assert "12.5 samples/s" in fig._suptitle.get_text()


def test_confidence_histogram_spreads_confidences_that_all_lie_between_095_and_1():
    """Twenty fixed bins over [0, 1] drew all of these as one bar."""
    fig = summary_figure(_summary([0.95 + 0.05 * i / 40 for i in range(40)]))
    ax = _axis(fig, "confidence")
    bars = [p for p in ax.patches if p.get_height() > 0]
    assert len(bars) >= 5
    lo, hi = ax.get_xlim()
    assert 0.9 <= lo and hi <= 1.0 + 1e-9
    assert sum(p.get_height() for p in bars) == 40


def test_figure_without_a_rate_or_rejects_says_so(tmp_path):
    """A set finished by a run that generated nothing (all shards kept) has no rate to show."""
    summary = _summary([0.99] * 10)
    summary.update(rejects={}, samples_per_s=None)
    fig = summary_figure(summary)
    assert "samples/s" not in fig._suptitle.get_text() or "not measured" in fig._suptitle.get_text()
    assert "none" in _axis(fig, "rejects").get_title()
    assert plot_summary(summary, tmp_path / "summary.png").stat().st_size > 5_000
