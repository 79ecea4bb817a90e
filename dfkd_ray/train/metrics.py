"""Training metrics of a run: one JSON line per report, and a loss-curve PNG at the end."""

from __future__ import annotations

import json
import time
from pathlib import Path


class MetricsLog:
    """Training metrics as JSONL (one line per report) and a loss-curve PNG at the end.

    ``resume_step``: lines a failed attempt logged after the checkpoint this run resumes from are
    dropped, so every step appears once.
    """

    def __init__(self, path: str | Path, *, resume_step: int = 0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_file():
            keep = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in keep))
        self.start = time.perf_counter()

    def write(self, metrics: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")

    def read(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def plot(self, png: str | Path, title: str = "") -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.read()
        keys = [k for k in ("loss", "kd", "block", "pt", "mask", "hit", "agreement", "target_spread", "lr")
                if any(k in r for r in rows)]
        fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3), squeeze=False)
        for ax, key in zip(axes[0], keys):
            pts = [(r["step"], r[key]) for r in rows if key in r]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", lw=1)
            ax.set_title(key)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(png, dpi=110)
        plt.close(fig)
        return Path(png)
