"""Build staging bundles for an offline GPU node that takes one upload of limited size at a time.

A bundle is one tar of wheels and/or directories (models, data), split into parts of at most
``--part-mib`` MiB. Each part is a folder ``<out>/<bundle>/partNN/`` holding its slice and the
bundle's ``manifest.json`` (sha256 of the whole tar and of every part), so one folder is one upload;
``install.py`` on the node collects the parts, reassembles and checks the tar, and installs it.

    python benchmarks/gpu_stage/build.py --bundle ray --out .stage
    python benchmarks/gpu_stage/build.py --bundle agnews --no-wheels --out .stage \\
        --files lm=LM_DIR --files base=ENCODER_DIR --files agnews=AGNEWS_DIR

The wheels are those of ``packages.txt`` (exact versions, ``pip download --no-deps`` each, for
CPython ``--python`` on manylinux x86-64), or of another list given as ``--packages`` (``packages-vllm.txt``:
vLLM and what it imports beyond such an image). Ray's wheel is rewritten without ``ray/jars/`` (Java
only, 41% of the wheel), vLLM's without the kernels a dense LM on a Hopper GPU does not load
(:data:`DROPPED`): their other members are copied byte for byte, so nothing is recompressed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import struct
import subprocess
import sys
import tarfile
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACKAGES = HERE / "packages.txt"
MANIFEST = "manifest.json"
FORMAT = 1

RAY_DROPPED = ("ray/jars/",)
"""Members left out of Ray's wheel: the Java workers' jar. The dashboard's browser bundle
(``ray/dashboard/client/build/``, 2.4 MiB compressed) stays: the dashboard refuses to start without
that directory, and the job server (``ray job submit``) runs inside the dashboard."""

VLLM_DROPPED = ("vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so", "vllm/_moe_C_stable_libtorch.abi3.so", "vllm/vllm-rs",
                "vllm/third_party/deep_gemm/", "vllm/third_party/fmha_sm100/")
"""Members left out of vLLM 0.26.0's wheel (289.6 -> about 102 MiB): FlashAttention 2's kernels (123.5
MiB; on compute capability 9, H100 and H200, vLLM runs FlashAttention 3, and it imports either build
only if present: ``vllm/vllm_flash_attn/flash_attn_interface.py``), the mixture-of-experts kernels
(39.0 MiB; imported under ``contextlib.suppress(ImportError)`` in ``vllm/platforms/cuda.py``, used by
MoE models only), the Rust front end of ``vllm serve`` (14.9 MiB; ``LLM`` does not start it), the
vendored DeepGEMM (6.0 MiB; FP8 matrix products, looked up only when a model asks and missed
gracefully: ``vllm/utils/deep_gemm.py``) and a Blackwell-only attention kernel (3.8 MiB). A dense
decoder-only LM on a Hopper GPU needs none of them."""

DROPPED = {"ray": RAY_DROPPED, "vllm": VLLM_DROPPED}
"""Per project (normalized name): the members its wheel travels without."""

PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")


@dataclass(frozen=True)
class Pin:
    name: str
    version: str
    only_if_older: bool = False


def read_packages(path: Path = PACKAGES) -> list[Pin]:
    """``name==version`` lines of ``packages.txt`` (``#`` comments; ``# if-older`` marks a wheel the
    node installs only where it has that package older or not at all)."""
    pins = []
    for line in Path(path).read_text().splitlines():
        spec, _, comment = line.partition("#")
        spec = spec.strip()
        if not spec:
            continue
        name, sep, version = spec.partition("==")
        if not sep or not version.strip():
            raise SystemExit(f"{path}: {line!r} is not name==version")
        pins.append(Pin(name.strip(), version.strip(), comment.strip().startswith("if-older")))
    return pins


def normalize(name: str) -> str:
    """A project name as wheel file names spell it (PEP 427: runs of ``-_.`` become ``_``, lower case)."""
    return re.sub(r"[-_.]+", "_", name).lower()


def find_wheel(directory: Path, pin: Pin) -> Path | None:
    """The wheel of ``pin`` in ``directory``, if there."""
    for wheel in sorted(Path(directory).glob("*.whl")):
        name, version = wheel.name.split("-")[:2]
        if normalize(name) == normalize(pin.name) and version == pin.version:
            return wheel
    return None


def download_wheels(pins: list[Pin], directory: Path, python: str = "3.12") -> dict[Pin, Path]:
    """Each pin's wheel for CPython ``python`` on manylinux x86-64 in ``directory`` (``pip download
    --no-deps``; wheels already there are kept)."""
    directory.mkdir(parents=True, exist_ok=True)
    missing = [p for p in pins if find_wheel(directory, p) is None]
    if missing:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--python-version", python, "--implementation", "cp", "--dest", str(directory)]
        cmd += [arg for platform in PLATFORMS for arg in ("--platform", platform)]
        cmd += [f"{p.name}=={p.version}" for p in missing]
        subprocess.run(cmd, check=True)
    found = {p: find_wheel(directory, p) for p in pins}
    lost = [f"{p.name}=={p.version}" for p, w in found.items() if w is None]
    if lost:
        raise SystemExit(f"pip download left no wheel for {lost} in {directory}")
    return found


# ---- rewriting a wheel without recompressing it ---------------------------------------------------

def _dos_time(date_time: tuple) -> tuple[int, int]:
    year, month, day, hour, minute, second = date_time
    return (hour << 11) | (minute << 5) | (second // 2), ((year - 1980) << 9) | (month << 5) | day


def copy_zip(src: Path, dst: Path, keep, replace: dict[str, bytes]) -> int:
    """Write ``dst``: the members of ``src`` for which ``keep(name)`` holds, their compressed bytes
    copied as they are, except those in ``replace`` (name -> new content, deflated here). Unix
    permissions stay (``raylet`` and ``gcs_server`` must stay executable). Returns the member count."""
    central = []
    with zipfile.ZipFile(src) as zin, open(src, "rb") as raw, open(dst, "wb") as out:
        for info in zin.infolist():
            if not keep(info.filename):
                continue
            if info.filename in replace:
                data = replace[info.filename]
                packer = zlib.compressobj(6, zlib.DEFLATED, -15)
                body = packer.compress(data) + packer.flush()
                crc, method, size = zlib.crc32(data), zipfile.ZIP_DEFLATED, len(data)
            else:
                if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                    raise ValueError(f"{src}: {info.filename} uses compression {info.compress_type}")
                raw.seek(info.header_offset)
                header = raw.read(30)
                if header[:4] != b"PK\x03\x04":
                    raise ValueError(f"{src}: no local header for {info.filename}")
                name_len, extra_len = struct.unpack("<HH", header[26:30])
                raw.seek(info.header_offset + 30 + name_len + extra_len)
                body = raw.read(info.compress_size)
                crc, method, size = info.CRC, info.compress_type, info.file_size
            name = info.filename.encode("utf-8")
            flags = 0 if info.filename.isascii() else 0x800  # bit 11: the name is UTF-8
            if max(len(body), size, out.tell()) >= 0xFFFFFFFF:
                raise ValueError(f"{src}: {info.filename} needs ZIP64, which this copy does not write")
            clock, date = _dos_time(info.date_time)
            offset = out.tell()
            out.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, flags, method, clock, date, crc, len(body), size,
                                  len(name), 0) + name)
            out.write(body)
            central.append(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, (3 << 8) | 20, 20, flags, method, clock,
                                       date, crc, len(body), size, len(name), 0, 0, 0, 0, info.external_attr,
                                       offset) + name)
        if len(central) >= 0xFFFF:
            raise ValueError(f"{src}: {len(central)} members need ZIP64, which this copy does not write")
        start = out.tell()
        for entry in central:
            out.write(entry)
        out.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(central), len(central), out.tell() - start, start, 0))
    return len(central)


def slim_wheel(src: Path, dst: Path, dropped: tuple[str, ...]) -> dict:
    """``src`` without the members under ``dropped`` (and their RECORD lines) written to ``dst``,
    which keeps the wheel's file name; returns what was dropped."""
    with zipfile.ZipFile(src) as z:
        infos = z.infolist()
        record = next(i.filename for i in infos if i.filename.endswith(".dist-info/RECORD"))
        lines = z.read(record).decode().splitlines(keepends=True)

    def keep(name: str) -> bool:
        return not name.startswith(dropped)

    kept_lines = [line for line in lines if keep(line.split(",", 1)[0])]
    dst.parent.mkdir(parents=True, exist_ok=True)
    copy_zip(src, dst, keep, {record: "".join(kept_lines).encode()})
    gone = [i for i in infos if not keep(i.filename)]
    return {"members": len(gone), "compressed_bytes": sum(i.compress_size for i in gone),
            "bytes_before": src.stat().st_size, "bytes_after": dst.stat().st_size}


# ---- bundles and parts --------------------------------------------------------------------------

def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _normalized(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = 0  # the same inputs give the same tar, so the same sha256
    return info


def write_tar(path: Path, wheels: list[Path], files: dict[str, Path]) -> None:
    """An uncompressed tar (wheels are compressed already): ``wheels/<wheel>`` and
    ``files/<name>/...`` for each directory or file of ``files``, in sorted order."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for wheel in sorted(wheels, key=lambda w: w.name):
            tar.add(wheel, arcname=f"wheels/{wheel.name}", filter=_normalized)
        for name in sorted(files):
            source = Path(files[name])
            if not source.exists():
                raise SystemExit(f"--files {name}={source}: no such file or directory")
            members = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
            for member in members:
                arcname = f"files/{name}" + ("" if member == source else f"/{member.relative_to(source).as_posix()}")
                tar.add(member, arcname=arcname, recursive=False, filter=_normalized)


def split_file(path: Path, part_bytes: int, out_dir: Path, stem: str) -> list[dict]:
    """Cut ``path`` into ``out_dir/partNN/<stem>.partNN`` of at most ``part_bytes`` each; returns
    each part's folder, file, size and sha256, in order."""
    parts = []
    with open(path, "rb") as f:
        while True:
            chunk = f.read(part_bytes)
            if not chunk and parts:
                break
            folder = f"part{len(parts):02d}"
            (out_dir / folder).mkdir(parents=True, exist_ok=True)
            name = f"{stem}.{folder}"
            (out_dir / folder / name).write_bytes(chunk)
            parts.append({"folder": folder, "file": name, "bytes": len(chunk),
                          "sha256": hashlib.sha256(chunk).hexdigest()})
            if len(chunk) < part_bytes:
                break
    return parts


def build_bundle(name: str, out: Path, wheels: list[tuple[Path, bool]], files: dict[str, Path],
                 part_bytes: int, python: str) -> dict:
    """Write bundle ``name`` under ``out/name/``: its parts, each folder with the manifest. ``wheels``
    are (wheel, only_if_older). Replaces an earlier build of the same bundle. Returns the manifest."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):
        raise SystemExit(f"--bundle {name!r}: use letters, digits, '_' and '-'")
    bundle_dir = out / name
    if bundle_dir.exists():
        for old in sorted(bundle_dir.glob("part*/*")):
            old.unlink()
        for old in sorted(bundle_dir.glob("part*")):
            old.rmdir()
    bundle_dir.mkdir(parents=True, exist_ok=True)
    tar_path = bundle_dir / f"{name}.tar"
    write_tar(tar_path, [w for w, _ in wheels], files)
    try:
        parts = split_file(tar_path, part_bytes, bundle_dir, f"{name}.tar")
        manifest = {"format": FORMAT, "bundle": name, "payload": tar_path.name, "bytes": tar_path.stat().st_size,
                    "sha256": sha256_file(tar_path), "python": python, "parts": parts,
                    "wheels": [{"file": w.name, "only_if_older": older} for w, older in sorted(wheels)],
                    "files": sorted(files), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    finally:
        tar_path.unlink()
    for part in parts:
        (bundle_dir / part["folder"] / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--bundle", required=True, help="the bundle's name (letters, digits, '_', '-')")
    p.add_argument("--out", type=Path, required=True, help="the bundle goes to OUT/BUNDLE/partNN/")
    p.add_argument("--packages", type=Path, default=PACKAGES, help="name==version lines (default: packages.txt)")
    p.add_argument("--no-wheels", action="store_true", help="files only")
    p.add_argument("--wheel-dir", type=Path, default=None, help="download cache (default: OUT/wheels-cpXY)")
    p.add_argument("--files", action="append", default=[], metavar="NAME=PATH",
                   help="a directory or file the node gets as files/NAME (repeatable)")
    p.add_argument("--python", default="3.12", help="the node's CPython version (default 3.12)")
    p.add_argument("--part-mib", type=float, default=60.0, help="largest part in MiB (default 60)")
    args = p.parse_args(argv)

    files = {}
    for item in args.files:
        key, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", key):
            raise SystemExit(f"--files {item!r}: give NAME=PATH with NAME in letters, digits, '.', '_', '-'")
        files[key] = Path(value).expanduser()
    wheels: list[tuple[Path, bool]] = []
    if not args.no_wheels:
        pins = read_packages(args.packages)
        cache = args.wheel_dir or args.out / f"wheels-cp{args.python.replace('.', '')}"
        found = download_wheels(pins, cache, args.python)
        for pin, wheel in found.items():
            dropped = DROPPED.get(normalize(pin.name))
            if dropped:
                slim = cache / "slim" / wheel.name
                stats = slim_wheel(wheel, slim, dropped)
                print(f"{wheel.name}: {stats['bytes_before'] / 2**20:.1f} MiB -> {stats['bytes_after'] / 2**20:.1f} "
                      f"MiB without {', '.join(dropped)} ({stats['members']} members)")
                wheel = slim
            wheels.append((wheel, pin.only_if_older))
    if not wheels and not files:
        raise SystemExit("nothing to bundle: give wheels (drop --no-wheels) or --files")
    manifest = build_bundle(args.bundle, args.out, wheels, files, int(args.part_mib * 2**20), args.python)
    print(f"bundle {args.bundle}: {manifest['bytes'] / 2**20:.1f} MiB in {len(manifest['parts'])} part(s), "
          f"sha256 {manifest['sha256'][:16]}")
    for part in manifest["parts"]:
        print(f"  {args.out / args.bundle / part['folder']}  {part['bytes'] / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
