"""What the README's install brings and the install commands the package gives: ``ray job submit``
and the dashboard work after it, and the vLLM extra is named by a command that can work (the package
is installed from its repository, not from PyPI)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_ray_is_required_with_its_job_server_and_installed_so():
    """Without ``ray[default]``, ``ray start --head`` runs no dashboard and ``ray job submit`` cannot
    connect to it; Ray Train's placement-group cleaner needs the dashboard's State API too."""
    from ray._private.utils import get_dashboard_dependency_error

    ray_req = [r for r in _pyproject()["project"]["dependencies"] if r.startswith("ray[")]
    assert ray_req == ["ray[default,data,train,tune]>=2.60,<2.61"]
    assert get_dashboard_dependency_error() is None


def test_vllm_install_command_is_the_repository_extra():
    from dfkd_ray.generation.vllm import INSTALL_HINT
    from dfkd_ray.preflight import VLLM_INSTALL

    assert "vllm" in _pyproject()["project"]["optional-dependencies"]
    assert VLLM_INSTALL == "pip install -e '.[vllm]' from the repository root"
    assert "pip install -e '.[vllm]' from the repository root" in INSTALL_HINT
