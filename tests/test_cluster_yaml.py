"""cluster.yaml is a valid Ray cluster-launcher file: Ray's own schema (``ray/autoscaler/ray-schema.json``)
and the checks `ray up` runs before it talks to the cloud (``prepare_config`` + ``validate_config``),
plus what this project needs from it (a CPU head, GPU workers, the vLLM extra, shared storage)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")
autoscaler_util = pytest.importorskip("ray.autoscaler._private.util")

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"
SHARED = "/mnt/shared"


@pytest.fixture(scope="module")
def schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


@pytest.fixture
def cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def ray_up_checks(config: dict) -> dict:
    """What `ray up` does to a config before the provider's own bootstrap (which needs cloud credentials)."""
    prepared = autoscaler_util.prepare_config(copy.deepcopy(config))
    autoscaler_util.validate_config(prepared)
    return prepared


def test_matches_rays_schema_as_written(cluster, schema):
    jsonschema.validate(cluster, schema)


def test_passes_the_checks_of_ray_up(cluster):
    prepared = ray_up_checks(cluster)
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_gpu_workers_vllm_extra_and_shared_storage(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) > 0}
    assert gpu and all(t["max_workers"] >= 1 and t["min_workers"] <= t["max_workers"] for t in gpu.values())
    assert cluster["max_workers"] >= max(t["max_workers"] for t in gpu.values())
    worker_setup = " ".join(cluster["setup_commands"] + cluster["worker_setup_commands"])
    assert "[vllm]" in worker_setup and "dfkd-ray" in worker_setup
    assert any(remote.rstrip("/").endswith("dfkd-ray") and local == "." for remote, local in cluster["file_mounts"].items())
    # every node mounts the shared file system on the host and hands it to its container at the same path
    assert any("mount -t nfs4" in c and c.rstrip().endswith(SHARED) for c in cluster["initialization_commands"])
    assert f"-v {SHARED}:{SHARED}" in cluster["docker"]["run_options"]


@pytest.mark.parametrize("breakage, error", [
    (lambda c: c.__setitem__("max_worker", 4), jsonschema.ValidationError),  # misspelt top-level key
    (lambda c: c["available_node_types"]["worker.gpu"].pop("resources"), jsonschema.ValidationError),
    (lambda c: c["available_node_types"]["worker.gpu"]["resources"].__setitem__("GPU", "four"), jsonschema.ValidationError),
    (lambda c: c["docker"].__setitem__("imagee", "x"), jsonschema.ValidationError),
    (lambda c: c.__setitem__("setup_commands", "pip install ."), jsonschema.ValidationError),  # a string, not a list
])
def test_broken_copies_fail_the_schema(cluster, schema, breakage, error):
    assert "worker.gpu" in cluster["available_node_types"]
    breakage(cluster)
    with pytest.raises(error):
        jsonschema.validate(cluster, schema)


@pytest.mark.parametrize("breakage, message", [
    (lambda c: c.__setitem__("head_node_type", "head.gpu"), "must be one of"),
    (lambda c: c["available_node_types"]["worker.gpu"].__setitem__("min_workers", 9), "smaller than the sum"),
])
def test_broken_copies_fail_the_ray_up_checks(cluster, breakage, message):
    breakage(cluster)
    with pytest.raises(ValueError, match=message):
        ray_up_checks(cluster)
