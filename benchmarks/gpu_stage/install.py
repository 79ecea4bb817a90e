"""Collect staging-bundle parts on an offline node, then reassemble, check and install each bundle.

Standard library only (run with the node's own ``python3``). Each upload carries one part folder
made by ``build.py``; this script keeps the part under ``--root`` (default ``/tmp/dfkd-stage``),
which must survive until the last part arrives:

    python3 benchmarks/gpu_stage/install.py .stage/ray/part00          # store; install when complete
    python3 benchmarks/gpu_stage/install.py --need ray,agnews           # exit 3 unless both installed
    . /tmp/dfkd-stage/env.sh                                            # PYTHONPATH, PATH, DFKD_STAGE_FILES

When every part of a bundle is there, the parts are joined and checked against the manifest's
sha256, the wheels are installed with ``pip install --no-index --no-deps --target ROOT/site``
(a wheel marked ``only_if_older`` only where the node's own copy is older or missing), and
``files/NAME`` lands in ``ROOT/files/NAME``. Exit status: 0 stored or installed; 3 a part that came
earlier is gone (the node started afresh: send the bundle again from part00) or ``--need`` is not
met; 4 a part or the joined tar does not match its sha256.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

MANIFEST = "manifest.json"
INSTALLED = "installed.json"
ENV_FILE = "env.sh"
CHECK_IMPORTS = {
    "ray": ("ray", "ray.data", "ray.train.torch", "pydantic", "jsonschema", "tensorboardX", "datasketch",
            "ray._private.prometheus_exporter"),
    "vllm": ("vllm", "vllm.entrypoints.llm", "vllm.v1.sample.logits_processor", "vllm.v1.worker.gpu_model_runner",
             "pydantic"),
}
"""Per project a bundle's wheels hold: the modules a job imports, checked after the bundle is installed.
Ray's last is what the dashboard agent, which every Ray node starts (with or without a dashboard),
imports first: without it (opencensus needs ``google.rpc``) no local Ray starts. vLLM's are the
offline engine and what its engine process imports for a dense LM on a GPU (``vllm.LLM`` imports
more of its modules only once it runs)."""


class StageError(Exception):
    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def bundle_dir(root: Path, bundle: str) -> Path:
    return root / "bundles" / bundle


def store_part(part_dir: Path, root: Path) -> tuple[dict, dict]:
    """Move the part in ``part_dir`` under ``root``, checked against its manifest; returns the
    manifest and the part's entry. Parts of an earlier build of the same bundle are discarded; a
    bundle already installed from this build takes nothing."""
    manifest = json.loads((part_dir / MANIFEST).read_text())
    part = next((p for p in manifest["parts"] if (part_dir / p["file"]).is_file()), None)
    if part is None:
        raise StageError(f"{part_dir} holds none of bundle {manifest['bundle']!r}'s part files", 4)
    where = bundle_dir(root, manifest["bundle"])
    kept = where / MANIFEST
    if kept.is_file() and json.loads(kept.read_text())["sha256"] != manifest["sha256"]:
        print(f"bundle {manifest['bundle']}: a different build was staged here before; its parts are discarded")
        shutil.rmtree(where)
    if is_installed(root, manifest["bundle"]):
        return manifest, part
    (where / "parts").mkdir(parents=True, exist_ok=True)
    kept.write_text(json.dumps(manifest, indent=1))
    if sha256_file(part_dir / part["file"]) != part["sha256"]:
        raise StageError(f"{part_dir / part['file']} does not match its sha256 in the manifest (a broken upload): "
                         "send this part again", 4)
    shutil.move(str(part_dir / part["file"]), str(where / "parts" / part["file"]))
    return manifest, part


def missing_parts(manifest: dict, root: Path) -> list[str]:
    parts = bundle_dir(root, manifest["bundle"]) / "parts"
    return [p["folder"] for p in manifest["parts"] if not (parts / p["file"]).is_file()]


def is_installed(root: Path, bundle: str) -> bool:
    """Whether ``bundle`` is installed under ``root`` (by the build its manifest names)."""
    where = bundle_dir(root, bundle)
    try:
        done = json.loads((where / INSTALLED).read_text())
        return done["sha256"] == json.loads((where / MANIFEST).read_text())["sha256"]
    except (OSError, ValueError, KeyError):
        return False


def reassemble(manifest: dict, parts_dir: Path, dest: Path) -> Path:
    """Join the parts (in manifest order) into ``dest``; raises StageError unless its sha256 and size
    are the manifest's."""
    with open(dest, "wb") as out:
        for part in manifest["parts"]:
            with open(parts_dir / part["file"], "rb") as f:
                shutil.copyfileobj(f, out, 1 << 20)
    if dest.stat().st_size != manifest["bytes"] or sha256_file(dest) != manifest["sha256"]:
        raise StageError(f"{dest}: the joined parts do not match the manifest's sha256; send the bundle again", 4)
    return dest


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version.split("+")[0])[:4])


def own_version(project: str, root: Path) -> str | None:
    """The version of ``project`` this interpreter has outside ``root`` (None: not installed)."""
    wanted = re.sub(r"[-_.]+", "-", project).lower()
    for dist in importlib.metadata.distributions():
        name = re.sub(r"[-_.]+", "-", dist.metadata["Name"] or "").lower()
        location = Path(str(dist.locate_file(""))).resolve()
        if name == wanted and not location.is_relative_to(root.resolve()):
            return dist.version
    return None


def wheels_to_install(manifest: dict, wheel_dir: Path, root: Path) -> list[Path]:
    chosen = []
    for wheel in manifest["wheels"]:
        project, version = wheel["file"].split("-")[:2]
        if wheel["only_if_older"]:
            have = own_version(project, root)
            if have is not None and _release(have) >= _release(version):
                print(f"  {project} {have} is here already (the bundle has {version}): kept")
                continue
        chosen.append(wheel_dir / wheel["file"])
    return chosen


def install_bundle(manifest: dict, root: Path) -> None:
    """Reassemble, check and install a bundle whose parts are all under ``root``."""
    where = bundle_dir(root, manifest["bundle"])
    payload = reassemble(manifest, where / "parts", where / manifest["payload"])
    unpacked = where / "unpacked"
    shutil.rmtree(unpacked, ignore_errors=True)
    with tarfile.open(payload) as tar:
        if sys.version_info >= (3, 12):
            tar.extractall(unpacked, filter="data")
        else:
            for member in tar.getmembers():  # the manifest's sha256 matched: members are the build's
                if member.name.startswith("/") or ".." in Path(member.name).parts:
                    raise StageError(f"{payload}: member {member.name!r} points outside the bundle", 4)
            tar.extractall(unpacked)
    site = root / "site"
    wheels = wheels_to_install(manifest, unpacked / "wheels", root)
    if wheels:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--disable-pip-version-check", "--target", str(site),
                        *map(str, wheels)], check=True)
    for name in manifest["files"]:
        target = root / "files" / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(unpacked / "files" / name), str(target))
    shutil.rmtree(unpacked)
    payload.unlink()
    shutil.rmtree(where / "parts")
    (where / INSTALLED).write_text(json.dumps({"sha256": manifest["sha256"], "wheels": [w.name for w in wheels],
                                               "files": manifest["files"]}, indent=1))
    write_env(root)


def write_env(root: Path) -> Path:
    site, files = root / "site", root / "files"
    path = root / ENV_FILE
    path.write_text(f"export PYTHONPATH={site}${{PYTHONPATH:+:$PYTHONPATH}}\n"
                    f"export PATH={site / 'bin'}:$PATH\n"
                    f"export DFKD_STAGE_FILES={files}\n")
    return path


def modules_to_check(manifest: dict) -> tuple[str, ...]:
    """The :data:`CHECK_IMPORTS` of the projects whose wheels ``manifest`` lists, in that order."""
    projects = {re.sub(r"[-_.]+", "_", w["file"].split("-")[0]).lower() for w in manifest["wheels"]}
    return tuple(m for project, modules in CHECK_IMPORTS.items() if project in projects for m in modules)


def check_imports(root: Path, modules: tuple[str, ...]) -> bool:
    """Import ``modules`` from ``root/site`` in a fresh interpreter; print their versions and, where
    Ray is among them, whether Ray's dashboard (the job server of ``ray job submit``) can start."""
    code = ("import importlib, sys\n"
            f"for m in {modules!r}:\n"
            "    mod = importlib.import_module(m)\n"
            "    print(f'  {m:<16} {getattr(mod, \"__version__\", \"\")}  {getattr(mod, \"__file__\", \"\")}')\n")
    if "ray" in modules:
        code += ("try:\n"
                 "    import ray.dashboard.optional_deps\n"
                 "    print('  ray job submit: the dashboard can start')\n"
                 "except ImportError as e:\n"
                 "    print(f'  ray job submit: unavailable ({e})')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root / "site"), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-c", code], env=env).returncode == 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("parts", nargs="*", type=Path, help="part folders (OUT/BUNDLE/partNN) to store")
    p.add_argument("--root", type=Path, default=Path("/tmp/dfkd-stage"), help="where parts and installs live")
    p.add_argument("--need", default="", help="comma-separated bundles that must be installed (else exit 3)")
    args = p.parse_args(argv)
    root = args.root.resolve()
    try:
        touched = {}
        for part_dir in args.parts:
            manifest, part = store_part(part_dir, root)
            bundle = manifest["bundle"]
            touched[bundle] = manifest
            if is_installed(root, bundle):
                print(f"bundle {bundle}: already installed from this build; {part['folder']} not needed")
                continue
            missing = missing_parts(manifest, root)
            print(f"bundle {bundle}: stored {part['folder']}; {len(manifest['parts']) - len(missing)}/"
                  f"{len(manifest['parts'])} parts here" + (f", missing {', '.join(missing)}" if missing else ""))
            earlier = [m for m in missing if m < part["folder"]]
            if earlier:
                raise StageError(f"bundle {bundle}: earlier parts ({', '.join(earlier)}) are gone from {root}: this "
                                 "node started afresh; send the bundle again from part00", 3)
        for bundle, manifest in touched.items():
            if not missing_parts(manifest, root) and not is_installed(root, bundle):
                print(f"bundle {bundle}: all parts here; joining, checking sha256, installing")
                install_bundle(manifest, root)
                print(f"bundle {bundle}: installed (site {root / 'site'}, files {root / 'files'})")
                modules = modules_to_check(manifest)
                if modules and not check_imports(root, modules):
                    raise StageError(f"bundle {bundle}: installed, but the job's modules do not import (above)", 4)
        need = [b for b in args.need.split(",") if b]
        absent = [b for b in need if not is_installed(root, b)]
        for bundle in need:
            print(f"bundle {bundle}: {'installed' if bundle not in absent else 'NOT installed'} under {root}")
        if absent:
            raise StageError(f"not installed here: {', '.join(absent)}; send their parts from part00 "
                             "(a node that started afresh has none)", 3)
        if (root / ENV_FILE).is_file():
            print(f"use: . {root / ENV_FILE}   ({(root / ENV_FILE).read_text().strip().replace(chr(10), '; ')})")
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.status
    return 0


if __name__ == "__main__":
    sys.exit(main())
