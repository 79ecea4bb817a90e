"""A sweep's results: the trials table (CSV and Markdown), the plot of the metric against each searched
parameter, the best configuration as a job YAML, and the closing line (no Ray here).

Every trial is a :class:`TrialRecord`: its parameters, the scores of its last scored epoch, how many
epochs it ran and how it ended. Trials are ranked by the sweep's metric, higher first.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from dfkd_ray.config import JobConfig

SCORES = ("proxy", "proxy_soft", "dev_accuracy", "eval_accuracy")
"""The scores a trial reports at the end of every epoch (:class:`~dfkd_ray.tuning.proxy.TrialScorer`)."""


@dataclass
class TrialRecord:
    """One trial of a sweep.

    ``status``: ``finished`` (ran every planned epoch), ``stopped early`` (ASHA stopped it),
    ``error`` (it failed; ``error`` says why) or ``not run``.
    """

    trial: str
    params: dict[str, Any]
    scores: dict[str, float] = field(default_factory=dict)
    epochs: float = 0.0
    planned_epochs: float = 0.0
    status: str = "not run"
    error: str = ""

    @property
    def stopped_early(self) -> bool:
        return self.status == "stopped early"


def ranked(records: Sequence[TrialRecord], metric: str) -> list[TrialRecord]:
    """Trials by ``metric``, highest first; trials without it last, in their order."""
    scored = sorted((r for r in records if metric in r.scores), key=lambda r: -r.scores[metric])
    return scored + [r for r in records if metric not in r.scores]


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def table_rows(records: Sequence[TrialRecord], keys: Sequence[str], metric: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the results table, ranked by ``metric``."""
    present = [s for s in SCORES if any(s in r.scores for r in records)]
    header = ["rank", "trial", *keys, f"metric ({metric})", *[s for s in present if s != metric], "epochs",
              "stopped early", "status"]
    rows = []
    for i, r in enumerate(ranked(records, metric), 1):
        score = lambda s: f"{r.scores[s]:.4f}" if s in r.scores else ""  # noqa: E731
        rows.append([str(i), r.trial, *[_value(r.params.get(k, "")) for k in keys], score(metric),
                     *[score(s) for s in present if s != metric], f"{r.epochs:g}/{r.planned_epochs:g}",
                     "yes" if r.stopped_early else "no", r.status + (f": {r.error}" if r.error else "")])
    return header, rows


def write_tables(records: Sequence[TrialRecord], keys: Sequence[str], metric: str, directory: Path) -> dict[str, Path]:
    """``results.csv`` and ``results.md`` in ``directory``; returns their paths."""
    header, rows = table_rows(records, keys, metric)
    directory.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    (directory / "results.csv").write_text(buffer.getvalue())
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]
    (directory / "results.md").write_text("\n".join(md) + "\n")
    return {"csv": directory / "results.csv", "markdown": directory / "results.md"}


def plot_metric(records: Sequence[TrialRecord], keys: Sequence[str], metric: str, path: Path) -> Path:
    """A PNG with one panel per searched parameter: each scored trial's ``metric`` against its value
    (numbers on a numeric axis, log where the values span a factor over 20; other values as
    categories); trials stopped early are hollow."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    scored = [r for r in records if metric in r.scores]
    fig = Figure(figsize=(4.2 * max(1, len(keys)), 3.6))
    FigureCanvasAgg(fig)
    for i, key in enumerate(keys):
        ax = fig.add_subplot(1, max(1, len(keys)), i + 1)
        values = [r.params.get(key) for r in scored]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if numeric:
            xs = [float(v) for v in values]
            if xs and min(xs) > 0 and max(xs) / min(xs) > 20:
                ax.set_xscale("log")
        else:
            categories = sorted({str(v) for v in values})
            xs = [categories.index(str(v)) for v in values]
            ax.set_xticks(range(len(categories)), labels=categories)
        for x, r in zip(xs, scored):
            ax.scatter([x], [r.scores[metric]], facecolors="none" if r.stopped_early else "tab:blue",
                       edgecolors="tab:blue")
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{metric} by parameter ({len(scored)} scored trials; hollow: stopped early)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def write_best_config(best: JobConfig, path: Path, sweep: str) -> Path:
    """``best`` (the best trial's job config) as a YAML that ``jobs/amalgamate.py --config`` runs as it
    is: its first line the command, the fields that differ from the defaults below."""
    body = yaml.safe_dump(best.model_dump(mode="json", exclude_defaults=True), sort_keys=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# python jobs/amalgamate.py --config {path}\n#\n# The best trial of the sweep {sweep!r}, "
                    f"as a job of its own: it writes to {best.output.dir}.\n{body}")
    return path


def progress_line(records: Sequence[TrialRecord], total: int) -> str:
    """``tune: 2 finished, 1 stopped early, 0 errors, 1 running, 1 waiting of 5 trials``."""
    count = lambda s: sum(r.status == s for r in records)  # noqa: E731
    return (f"tune: {count('finished')} finished, {count('stopped early')} stopped early, {count('error')} errors, "
            f"{count('running')} running, {total - len(records) + count('not run')} waiting of {total} trials")


def final_line(name: str, best: Optional[TrialRecord], metric: str, best_yaml: Optional[Path], seconds: float,
               total: int) -> str:
    if best is None:
        return f"tune {name}: done in {seconds:.0f} s, no trial of {total} reported {metric}"
    params = ", ".join(f"{k}={_value(v)}" for k, v in best.params.items())
    return (f"tune {name}: done in {seconds:.0f} s, {total} trials; best {best.trial} ({params}) {metric} "
            f"{best.scores[metric]:.4f}; run it: python jobs/amalgamate.py --config {best_yaml}")


def rank_correlation(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation of two score lists (ties share their mean rank)."""
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)
