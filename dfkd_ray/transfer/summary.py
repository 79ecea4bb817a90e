"""Transfer-set statistics, accumulated shard by shard (the whole set is never in memory):
per teacher and class counts, confidence histogram, token-length histogram, distinct-1/2,
rejects by reason and throughput; printed as a short table and drawn as a PNG."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa

CONFIDENCE_BINS = 200
"""Bins of the stored confidence histogram over [0, 1]: fine enough that the figure can regroup
them over the range the confidences actually span (:func:`confidence_bars`)."""
SHOWN_BINS = 20


class SummaryAccumulator:
    def __init__(self) -> None:
        self.rows = 0
        self.per_class: Counter = Counter()  # (teacher, label_name) -> rows
        self.confidence_hist = [0] * CONFIDENCE_BINS
        self.length_hist: Counter = Counter()
        self.tokens = 0
        self._uni: set[int] = set()
        self._bi: set[int] = set()
        self._n_uni = 0
        self._n_bi = 0

    def add(self, table: pa.Table) -> None:
        cols = table.select(["teacher", "label_name", "confidence", "num_tokens", "text"]).to_pydict()
        for teacher, label, conf, ntok, text in zip(*cols.values()):
            self.rows += 1
            self.per_class[(teacher, label)] += 1
            self.confidence_hist[min(int(conf * CONFIDENCE_BINS), CONFIDENCE_BINS - 1)] += 1
            self.length_hist[ntok] += 1
            self.tokens += ntok
            words = text.split()
            self._n_uni += len(words)
            self._n_bi += max(len(words) - 1, 0)
            self._uni.update(hash(w) for w in words)
            self._bi.update(hash((a, b)) for a, b in zip(words, words[1:]))

    def result(self) -> dict:
        return {
            "rows": self.rows,
            "per_class": [{"teacher": t, "label": lbl, "rows": n} for (t, lbl), n in sorted(self.per_class.items())],
            "confidence_histogram": {"bins": CONFIDENCE_BINS, "counts": self.confidence_hist},
            "token_length_histogram": {str(k): v for k, v in sorted(self.length_hist.items())},
            "mean_tokens": self.tokens / self.rows if self.rows else 0.0,
            "distinct_1": len(self._uni) / self._n_uni if self._n_uni else 0.0,
            "distinct_2": len(self._bi) / self._n_bi if self._n_bi else 0.0,
        }


def format_table(summary: dict) -> str:
    lines = [f"{'teacher':<16} {'label':<20} {'rows':>8}"]
    lines += [f"{r['teacher']:<16} {r['label']:<20} {r['rows']:>8}" for r in summary["per_class"]]
    rej = ", ".join(f"{k} {v}" for k, v in sorted(summary.get("rejects", {}).items())) or "none"
    lines.append(f"rows {summary['rows']}  mean tokens {summary['mean_tokens']:.1f}  distinct-1 "
                 f"{summary['distinct_1']:.3f}  distinct-2 {summary['distinct_2']:.3f}  rejects: {rej}")
    return "\n".join(lines)


def confidence_bars(histogram: dict, shown: int = SHOWN_BINS) -> tuple[list[float], list[int], float]:
    """The stored confidence histogram regrouped into at most ``shown`` equal bars over the range the
    confidences span (whole stored bins), so confidences that all lie in 0.95-1.0 still show their
    distribution. Returns ``(left edges, counts, bar width)``."""
    bins, counts = histogram["bins"], histogram["counts"]
    filled = [i for i, c in enumerate(counts) if c]
    if not filled:
        return [], [], 1.0 / bins
    first, last = filled[0], filled[-1] + 1
    group = max(1, -(-(last - first) // shown))  # stored bins per bar
    edges, bars = [], []
    for start in range(first, last, group):
        edges.append(start / bins)
        bars.append(sum(counts[start:start + group]))
    return edges, bars, group / bins


def summary_figure(summary: dict):
    """Four panels: rows per (teacher, class), the teacher-confidence histogram over the range the
    confidences span, token lengths, and rejects by reason; the title gives the generation rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 3.8))
    names = [f"{r['teacher']}\n{r['label']}" for r in summary["per_class"]]
    axes[0].bar(range(len(names)), [r["rows"] for r in summary["per_class"]], color="tab:blue")
    axes[0].set_xticks(range(len(names)), names, fontsize=7)
    axes[0].set_title("rows per teacher and class")
    edges, counts, width = confidence_bars(summary["confidence_histogram"])
    axes[1].bar(edges, counts, width=width, align="edge", color="tab:orange", edgecolor="white")
    if edges:
        axes[1].set_xlim(edges[0], min(edges[-1] + width, 1.0))
    axes[1].set_title("teacher confidence for the row's class\n(belief, not quality)", fontsize=9)
    lengths = {int(k): v for k, v in summary["token_length_histogram"].items()}
    axes[2].bar(list(lengths), list(lengths.values()), width=1.0, color="tab:green")
    axes[2].set_title(f"tokens per text (mean {summary['mean_tokens']:.1f})")
    rejects = sorted(summary.get("rejects", {}).items())
    axes[3].bar(range(len(rejects)), [n for _, n in rejects], color="tab:red")
    axes[3].set_xticks(range(len(rejects)), [k for k, _ in rejects], fontsize=7, rotation=15)
    axes[3].set_title(f"rejects by reason ({sum(n for _, n in rejects)} of {summary.get('requests', '?')} requests)"
                      if rejects else "rejects by reason: none")
    rate = summary.get("samples_per_s")
    rate = f"{rate:.1f} samples/s" if rate else "samples/s not measured (nothing generated by the run that finished it)"
    fig.suptitle(f"transfer set: {summary['rows']} rows, distinct-1 {summary['distinct_1']:.3f}, "
                 f"distinct-2 {summary['distinct_2']:.3f}, {rate}", fontsize=10)
    fig.tight_layout()
    return fig


def plot_summary(summary: dict, path: str | Path) -> Path:
    """:func:`summary_figure` saved as a PNG at ``path``."""
    import matplotlib.pyplot as plt

    fig = summary_figure(summary)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_summary(summary: dict, directory: str | Path) -> None:
    directory = Path(directory)
    tmp = directory / ".summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    tmp.replace(directory / "summary.json")
    plot_summary(summary, directory / "summary.png")
