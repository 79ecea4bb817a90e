"""Staging bundles for an offline GPU node (``benchmarks/gpu_stage``): parts join back into the very
bytes that were split, a broken or lost part is named, a wheel rewritten without some members is a
valid wheel, and Ray's wheel without ``ray/jars/`` installs and runs a Ray Data actor pipeline.

The Ray test downloads Ray's wheel for this interpreter once into ``.cache/gpu_stage/`` (about 80 MB;
kept there for later runs) and is skipped, saying so, where the package index cannot be reached: the
point is the real wheel from the index, which no locally built stand-in would prove.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STAGE = ROOT / "benchmarks" / "gpu_stage"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"gpu_stage_{name}", STAGE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


build, install = load("build"), load("install")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def source(tmp_path) -> Path:
    """A folder of files with random bytes (incompressible, like model weights), one nested."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for i, size in enumerate((150_001, 70_000, 1)):
        (src / ("sub" if i == 1 else "") / f"f{i}.bin").write_bytes(os.urandom(size))
    return src


def test_split_parts_join_back_byte_identical(tmp_path, source):
    tar = tmp_path / "whole.tar"
    build.write_tar(tar, [], {"model": source})
    manifest = build.build_bundle("data", tmp_path / "out", [], {"model": source}, part_bytes=64_000,
                                  python="3.12")
    assert len(manifest["parts"]) == -(-tar.stat().st_size // 64_000) >= 4
    assert manifest["sha256"] == sha256(tar) and manifest["bytes"] == tar.stat().st_size  # the tar is reproducible
    parts_dir = tmp_path / "flat"
    parts_dir.mkdir()
    for part in manifest["parts"]:
        folder = tmp_path / "out" / "data" / part["folder"]
        assert json.loads((folder / "manifest.json").read_text()) == manifest  # each folder travels alone
        (parts_dir / part["file"]).write_bytes((folder / part["file"]).read_bytes())
    joined = install.reassemble(manifest, parts_dir, tmp_path / "joined.tar")
    assert joined.read_bytes() == tar.read_bytes()


def test_install_collects_parts_one_upload_at_a_time_and_unpacks_the_files(tmp_path, source):
    manifest = build.build_bundle("data", tmp_path / "out", [], {"model": source}, part_bytes=64_000,
                                  python="3.12")
    root = tmp_path / "node"
    folders = [tmp_path / "out" / "data" / p["folder"] for p in manifest["parts"]]
    for folder in folders[:-1]:
        assert install.main([str(folder), "--root", str(root)]) == 0
        assert install.main(["--need", "data", "--root", str(root)]) == 3  # not complete yet
    assert install.main([str(folders[-1]), "--root", str(root), "--need", "data"]) == 0
    for file in source.rglob("*"):
        if file.is_file():
            assert (root / "files" / "model" / file.relative_to(source)).read_bytes() == file.read_bytes()
    assert not (root / "bundles" / "data" / "parts").exists()  # the parts and the tar are removed once installed
    env = (root / "env.sh").read_text()
    assert f"PYTHONPATH={root / 'site'}" in env and f"DFKD_STAGE_FILES={root / 'files'}" in env


def test_a_lost_earlier_part_or_a_broken_one_is_named(tmp_path, source, capsys):
    build.build_bundle("data", tmp_path / "out", [], {"model": source}, part_bytes=64_000, python="3.12")
    out = tmp_path / "out" / "data"
    assert install.main([str(out / "part01"), "--root", str(tmp_path / "fresh")]) == 3
    assert "send the bundle again from part00" in capsys.readouterr().err
    broken = out / "part00" / "data.tar.part00"
    broken.write_bytes(b"x" + broken.read_bytes()[1:])
    assert install.main([str(out / "part00"), "--root", str(tmp_path / "other")]) == 4
    assert "does not match its sha256" in capsys.readouterr().err


def test_a_slimmed_wheel_keeps_the_other_members_their_bytes_and_modes(tmp_path):
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    members = {"pkg/__init__.py": b"VALUE = 1\n", "pkg/jars/big.jar": os.urandom(5000), "pkg/bin/tool": b"#!/bin/sh\n",
               "pkg/data/\u00e9t\u00e9.txt": b"summer\n"}
    record = "".join(f"{name},sha256=x,{len(data)}\n" for name, data in members.items()) + "pkg-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            info = zipfile.ZipInfo(name, date_time=(2026, 1, 2, 3, 4, 6))
            info.external_attr = (0o100755 if name.endswith("tool") else 0o100644) << 16
            z.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
        z.writestr("pkg-1.0.dist-info/RECORD", record)
    slim = tmp_path / "slim" / wheel.name
    stats = build.slim_wheel(wheel, slim, dropped=("pkg/jars/",))
    assert stats["members"] == 1 and stats["bytes_after"] < stats["bytes_before"]
    with zipfile.ZipFile(slim) as z:
        assert z.testzip() is None
        assert sorted(z.namelist()) == sorted([n for n in members if "jars" not in n] + ["pkg-1.0.dist-info/RECORD"])
        for name in z.namelist():
            if name in members:
                assert z.read(name) == members[name]
                assert z.getinfo(name).date_time == (2026, 1, 2, 3, 4, 6)
        assert stat.S_IMODE(z.getinfo("pkg/bin/tool").external_attr >> 16) == 0o755
        assert "jars" not in z.read("pkg-1.0.dist-info/RECORD").decode()


def test_each_bundle_checks_the_modules_of_the_projects_it_carries():
    def manifest(*files):
        return {"wheels": [{"file": f, "only_if_older": False} for f in files]}

    ray = manifest("ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl", "pydantic-2.14.4-py3-none-any.whl")
    vllm = manifest("vllm-0.26.0-cp38-abi3-manylinux_2_28_x86_64.whl",
                    "pyzmq-27.3.0-cp312-abi3-manylinux_2_28_x86_64.whl")
    assert install.modules_to_check(ray) == install.CHECK_IMPORTS["ray"]
    assert install.modules_to_check(vllm) == install.CHECK_IMPORTS["vllm"]
    assert install.modules_to_check(manifest()) == ()  # files only: nothing to import


def test_the_vllm_list_pins_the_release_built_for_the_nodes_torch_and_drops_only_optional_kernels():
    pins = {build.normalize(p.name): p for p in build.read_packages(STAGE / "packages-vllm.txt")}
    assert pins["vllm"].version == "0.26.0"  # the newest vLLM whose wheel pins torch==2.11.0
    assert len(pins) == len(build.read_packages(STAGE / "packages-vllm.txt"))  # one version of each
    dropped = build.DROPPED["vllm"]
    for kept in ("vllm/_C_stable_libtorch.abi3.so", "vllm/vllm_flash_attn/_vllm_fa3_C.abi3.so",
                 "vllm/vllm_flash_attn/flash_attn_interface.py"):
        assert not kept.startswith(dropped)


RAY_PIPELINE = """
import json, sys
import numpy as np
import ray

class Double:
    def __call__(self, batch):
        return {"id": batch["id"], "twice": batch["id"] * 2}

ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # never a Ray running beside it
ds = ray.data.range(8, override_num_blocks=2).map_batches(
    Double, batch_size=4, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=1))
rows = sorted((int(r["id"]), int(r["twice"])) for r in ds.iter_rows())
print(json.dumps({"ray": ray.__file__, "rows": rows}))
ray.shutdown()
"""


@pytest.fixture(scope="module")
def ray_wheel() -> Path:
    """Ray's wheel (the version installed here) for this interpreter, from the package index."""
    if platform.machine() != "x86_64" or not sys.platform.startswith("linux"):
        pytest.skip("the staged wheels are manylinux x86-64 builds")
    from importlib.metadata import version

    pin = build.Pin("ray", version("ray"))
    cache = ROOT / ".cache" / "gpu_stage" / f"wheels-cp{sys.version_info.major}{sys.version_info.minor}"
    try:
        return build.download_wheels([pin], cache, f"{sys.version_info.major}.{sys.version_info.minor}")[pin]
    except (subprocess.CalledProcessError, SystemExit) as e:
        pytest.skip(f"no Ray {pin.version} wheel for this interpreter: pip download failed ({e}); the index "
                    "cannot be reached from here")


@pytest.mark.slow
@pytest.mark.ray
def test_ray_without_its_jars_installs_and_runs_an_actor_pipeline(tmp_path, ray_wheel):
    slim = tmp_path / "slim" / ray_wheel.name
    stats = build.slim_wheel(ray_wheel, slim, build.DROPPED["ray"])
    assert stats["bytes_after"] < 0.65 * stats["bytes_before"]  # the jar is about 40% of the wheel
    build.build_bundle("ray", tmp_path / "out", [(slim, False)], {}, part_bytes=60 * 2**20,
                       python=f"{sys.version_info.major}.{sys.version_info.minor}")
    root = tmp_path / "node"
    (folder,) = (tmp_path / "out" / "ray").glob("part*")  # Ray alone fits one part
    manifest, _ = install.store_part(folder, root)
    install.install_bundle(manifest, root)  # the pipeline below is the check (install.py's own imports torch too)
    site = root / "site"
    assert (site / "ray" / "_raylet.so").is_file() and not (site / "ray" / "jars").exists()
    env = {**os.environ, "PYTHONPATH": str(site), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    run = subprocess.run([sys.executable, "-c", RAY_PIPELINE], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert Path(result["ray"]).is_relative_to(site)  # this Ray, not the environment's
    assert result["rows"] == [[i, 2 * i] for i in range(8)]


def test_the_agnews_job_is_the_benchmarks_stratanet_row_as_overrides_of_the_preset(tmp_path, monkeypatch):
    """The runner's job must be the AG News benchmark's StrataNet row, or its accuracy says nothing
    about the benchmark's; ``row_overrides`` raises when the preset plus overrides give anything else."""
    import importlib

    from dfkd_ray.config import read_config, validate_config

    monkeypatch.syspath_prepend(str(ROOT))
    job = importlib.import_module("benchmarks.gpu_stage.run_agnews_job")
    settings = job.parse_args(["--lm", str(tmp_path / "lm"), "--base", str(tmp_path / "base"),
                               "--agnews", str(tmp_path / "agnews"), "--work", str(tmp_path / "work")])
    settings.args.device = "cuda"
    row = job.job_config(settings, "stratanet", settings.args.seed)
    assert [t.name for t in row.teachers] == list(settings.spec.teachers) == ["world_sports", "business_scitech"]
    assert row.transfer.samples_per_class == settings.spec.samples_per_class  # the spec's, not a copy
    assert job.eval_label_map(job.label_space(settings.spec)) == {"1": "World", "2": "Sports", "3": "Business",
                                                                  "4": "Sci/Tech"}  # AG News's own label ids
    extra = {"ray.num_generation_actors": 4, "ray.gpus_per_generation_actor": 0.25, "ray.num_train_workers": 1,
             "output.dir": str(tmp_path / "run"), "eval.path": str(tmp_path / "test.csv"), "eval.text_column": "text"}
    overrides = job.row_overrides(row, extra)
    cfg = validate_config(read_config(job.CONFIG, overrides))
    assert cfg.ray.num_generation_actors == 4 and cfg.ray.gpus_per_generation_actor == 0.25
    assert (cfg.train.epochs, cfg.train.learning_rate, cfg.train.batch_size) == (6, 5e-5, 32)  # the row's, not the preset's
    # the benchmark shuffles its rows every epoch; shards are in class order, and 0 would train the job in it
    assert cfg.train.shuffle_buffer > 0
    assert cfg.transfer.steered.lm_path == tmp_path / "lm" and cfg.amalgamation.method == "stratanet"
    assert not any(o.startswith(("transfer.corpus.", "transfer.steered.control_strength=")) for o in overrides)


def test_gpu_samples_fall_into_the_stage_whose_window_holds_them(tmp_path, monkeypatch):
    import importlib
    from datetime import datetime

    monkeypatch.syspath_prepend(str(ROOT))
    job = importlib.import_module("benchmarks.gpu_stage.run_agnews_job")
    t0 = datetime(2026, 1, 2, 3, 4, 5).timestamp()
    text = "".join(f"{datetime.fromtimestamp(t0 + s):%Y/%m/%d %H:%M:%S}.500, 0, {u}, {m}\n"
                   for s, u, m in ((1, 0, 500), (12, 80, 9000), (14, 90, 9100), (21, 40, 700)))
    samples = job.parse_samples(text + "2026/01/02 03:0")  # the last line cut off when the sampler stopped
    assert [(round(s[0] - t0, 1), s[2], s[3]) for s in samples] == [(1.5, 0, 500), (12.5, 80, 9000), (14.5, 90, 9100),
                                                                   (21.5, 40, 700)]
    out = tmp_path / "run"
    (out / "transfer_set").mkdir(parents=True)
    (out / "transfer_set" / "manifest.json").write_text(json.dumps(
        {"shards": {"0": {"finished_at": t0 + 14, "seconds": 4}, "1": {"finished_at": t0 + 15, "seconds": 2}}}))
    (out / "transfer_set" / "summary.json").write_text("{}")
    os.utime(out / "transfer_set" / "summary.json", (t0 + 16, t0 + 16))
    windows = job.stage_windows(out, t0, t0 + 30)
    assert windows == {"startup": (t0, t0 + 10), "generation": (t0 + 10, t0 + 16), "finish": (t0 + 16, t0 + 30)}
    table = job.stage_table(windows, samples)
    assert table["startup"] == {"seconds": 10, "samples": 1, "gpu_util_mean": 0, "gpu_util_max": 0,
                                "memory_mib_max": 500}
    assert table["generation"]["gpu_util_mean"] == 85 and table["generation"]["memory_mib_max"] == 9100
