"""The install commands the package gives: the vLLM extra is named by a command that can work (the
package is installed from its repository, not from PyPI)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_vllm_install_command_is_the_repository_extra():
    from dfkd_ray.generation.vllm import INSTALL_HINT
    from dfkd_ray.preflight import VLLM_INSTALL

    assert "vllm" in _pyproject()["project"]["optional-dependencies"]
    assert VLLM_INSTALL == "pip install -e '.[vllm]' from the repository root"
    assert "pip install -e '.[vllm]' from the repository root" in INSTALL_HINT
