"""Imports point one way: the package imports neither ray, vllm nor transformers, the pure-math layer
imports torch only, and only orchestration imports ray."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import dfkd_ray

HEAVY = ("ray", "vllm", "transformers")
NOT_MATH = HEAVY + ("tokenizers", "pydantic", "pyarrow")
"""What the pure-math layer never imports: it needs torch only."""


def _loaded_after(modules: list[str], watched: tuple[str, ...] = HEAVY) -> list[str]:
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules) +
            f"print(','.join(m for m in {watched!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return [m for m in out.stdout.strip().split(",") if m]


def test_package_import_is_light():
    assert _loaded_after(["dfkd_ray", "dfkd_ray.config", "dfkd_ray.labels"]) == []


def test_math_layer_imports_torch_only():
    math_dir = Path(dfkd_ray.__file__).parent / "math"
    modules = [f"dfkd_ray.math.{m.name}" for m in pkgutil.iter_modules([str(math_dir)])]
    assert modules, "no math modules found"
    assert _loaded_after(modules, NOT_MATH) == []


def test_only_orchestration_imports_ray():
    """Source check: `import ray` appears only under dfkd_ray/orchestration."""
    root = Path(dfkd_ray.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        if "orchestration" in path.parts:
            continue
        for line in path.read_text().splitlines():
            s = line.strip()
            if s.startswith(("import ray", "from ray")):
                offenders.append(f"{path.relative_to(root)}: {s}")
    assert offenders == []


def test_baseline_sources_leave_generation_unimported():
    """Selecting ``corpus`` or ``random_words`` imports no generation engine (the registry imports a
    source's module only when it is chosen)."""
    code = ("import sys\nfrom dfkd_ray.transfer.sources import get_source_class\n"
            "get_source_class('corpus'); get_source_class('random_words')\n"
            "print(','.join(m for m in sys.modules if m.split('.')[0] == 'vllm' or m.startswith('dfkd_ray.generation')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
