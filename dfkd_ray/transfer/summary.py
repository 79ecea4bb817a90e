"""Transfer-set statistics, accumulated shard by shard (the whole set is never in memory):
per teacher and class counts, confidence histogram, token-length histogram, distinct-1/2,
rejects by reason and throughput; printed as a short table and drawn as a PNG."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa

CONFIDENCE_BINS = 20


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


def summary_figure(summary: dict):
    """Three panels: rows per (teacher, class), teacher-confidence histogram, token lengths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    names = [f"{r['teacher']}\n{r['label']}" for r in summary["per_class"]]
    axes[0].bar(range(len(names)), [r["rows"] for r in summary["per_class"]], color="tab:blue")
    axes[0].set_xticks(range(len(names)), names, fontsize=7)
    axes[0].set_title("rows per teacher and class")
    bins = summary["confidence_histogram"]["bins"]
    axes[1].bar([(i + 0.5) / bins for i in range(bins)], summary["confidence_histogram"]["counts"],
                width=1 / bins, color="tab:orange", edgecolor="white")
    axes[1].set_xlim(0, 1)
    axes[1].set_title("teacher confidence for the row's class\n(belief, not quality)", fontsize=9)
    lengths = {int(k): v for k, v in summary["token_length_histogram"].items()}
    axes[2].bar(list(lengths), list(lengths.values()), width=1.0, color="tab:green")
    axes[2].set_title(f"tokens per text (mean {summary['mean_tokens']:.1f})")
    fig.suptitle(f"transfer set: {summary['rows']} rows, distinct-1 {summary['distinct_1']:.3f}, "
                 f"distinct-2 {summary['distinct_2']:.3f}", fontsize=10)
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
