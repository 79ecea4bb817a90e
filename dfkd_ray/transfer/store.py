"""Transfer sets on disk: Parquet shards plus a manifest, complete shards only.

Layout of a transfer-set directory::

    manifest.json          format, fingerprint, the config that made it, shard list, complete flag
    shard-00000.parquet    one per shard of the requests table, written whole then renamed
    .shard-00001.parquet.<pid>.tmp   a shard being written (hidden: no reader picks it up)

A shard becomes visible only when complete: it is written under a hidden temporary name,
flushed to disk, then renamed (atomic on POSIX); the manifest is replaced the same way and lists
complete shards only. A process killed at any point leaves at most a temporary file, which the
next :meth:`TransferSetStore.open` deletes, and perhaps a renamed shard the manifest does not list
yet, which it verifies and adopts. A shard file that cannot be read as one (truncated, or a foreign
Parquet file under a shard's name) is moved to ``.damaged/`` and its requests are made again; a
missing manifest is rebuilt from the shards, which carry the set's fingerprint. A directory made with a different configuration is refused
once it holds a shard; one where a failed run wrote none is planned anew.

Each shard carries its own manifest entry (requests, rejects, given up, worker, ...) as Parquet
key-value metadata, written in the same atomic rename as its rows: a shard adopted on resume
keeps its statistics, so the finished set's summary equals an uninterrupted run's. Shards no
driver commits (a killed driver, or streaming mode, where training consumes the rows as the
actors write them) are adopted this way with the same manifest entry a committed one gets.

Read a finished set with :func:`transfer_set_files` (the manifest's list), e.g.
``ray.data.read_parquet(transfer_set_files(d))`` or
``datasets.load_dataset("parquet", data_files=transfer_set_files(d))``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from dfkd_ray.stages import diff_descriptions
from dfkd_ray.transfer.schema import TRANSFER_SCHEMA, validate_table

FORMAT = "dfkd-transfer-set/1"
MANIFEST = "manifest.json"
STATS_KEY = b"dfkd.shard_stats"
"""Parquet key-value metadata key holding a shard's statistics (JSON)."""
FINGERPRINT_KEY = b"dfkd.fingerprint"
"""Parquet key-value metadata key holding the fingerprint of the set a shard was written for."""
DAMAGED = ".damaged"
"""Where shard files that cannot be read as shards are moved (hidden: no reader picks them up)."""


class TransferSetError(ValueError):
    """A transfer-set directory that cannot be used as asked."""


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def read_manifest(directory: str | Path) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise TransferSetError(f"{directory} is not a transfer set (no {MANIFEST}); make one with jobs/generate.py")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise TransferSetError(f"{path}: unknown format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def transfer_set_files(directory: str | Path, *, require_complete: bool = True) -> list[str]:
    """Paths of the complete shards listed in the manifest, in shard order."""
    manifest = read_manifest(directory)
    if require_complete and not manifest["complete"]:
        done, total = len(manifest["shards"]), manifest["num_shards"]
        raise TransferSetError(f"transfer set {directory} is unfinished ({done}/{total} shards); rerun the job that "
                               "makes it to finish it, or pass require_complete=False to read what is there")
    return [str(Path(directory) / manifest["shards"][k]["file"]) for k in sorted(manifest["shards"])]


def read_transfer_table(directory: str | Path, *, require_complete: bool = True) -> pa.Table:
    files = transfer_set_files(directory, require_complete=require_complete)
    if not files:
        return TRANSFER_SCHEMA.empty_table()
    return pa.concat_tables(pq.read_table(f, schema=TRANSFER_SCHEMA) for f in files)


def read_shard_stats(path: str | Path) -> dict:
    """The statistics stored in a shard file's footer ({} for a shard written without them)."""
    raw = (pq.read_schema(path).metadata or {}).get(STATS_KEY)
    return json.loads(raw) if raw else {}


def _manifest_fingerprint(directory: Path) -> str | None:
    """The fingerprint in ``directory``'s manifest, read from its head: the manifest is written with
    sorted keys, so ``fingerprint`` comes before the (long) shard list."""
    path = directory / MANIFEST
    if not path.is_file():
        return None
    with open(path) as f:
        for line in f:
            if line.startswith(' "fingerprint": '):
                return json.loads(line.split(":", 1)[1].strip().rstrip(","))
    return None


def _shard_problem(path: Path, *, listed: bool) -> str:
    """Why ``path`` cannot be a shard of a set ('' when it can): its footer (a listed shard), or all of
    it (one to adopt), must read as a table of the transfer-set schema."""
    try:
        if listed:
            schema = pq.read_schema(path)
            if not schema.equals(TRANSFER_SCHEMA, check_metadata=False):
                return "its columns are not the transfer-set schema"
        else:
            validate_table(pq.read_table(path))
        read_shard_stats(path)
    except (pa.ArrowException, OSError, ValueError) as e:  # SchemaError and JSON errors are ValueErrors
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return ""


def write_shard_file(directory: str | Path, index: int, table: pa.Table, stats: dict | None = None) -> Path:
    """Write a shard under a hidden temporary name, flush it, then rename it into place.

    ``stats`` (its manifest entry; ``rows`` is set from the table) travel inside the file, so the
    rename publishes rows and statistics together, and a shard no one commits (a killed driver, or
    streaming mode, where training consumes the rows) is adopted later with the same entry. Safe to
    call from any process (a Ray actor on any node of a shared filesystem); only the driver updates
    the manifest (:meth:`TransferSetStore.commit_shard`, or adoption in :meth:`TransferSetStore.open`).
    """
    validate_table(table)
    directory = Path(directory)
    final = directory / shard_name(index)
    tmp = directory / f".{final.name}.{os.getpid()}.tmp"
    meta = dict(table.schema.metadata or {})
    if stats:
        meta[STATS_KEY] = json.dumps({**{k: v for k, v in stats.items() if k != "file"}, "rows": len(table)}).encode()
    set_fingerprint = _manifest_fingerprint(directory)
    if set_fingerprint:
        meta[FINGERPRINT_KEY] = set_fingerprint.encode()
    table = table.replace_schema_metadata(meta)
    pq.write_table(table, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    return final


def _check_rebuild(directory: Path, fingerprint: str) -> None:
    """A directory without a manifest may hold a set's shards (a deleted manifest): they are adopted
    when every one was written for this fingerprint. Raises :class:`TransferSetError` for other files,
    or for shards of another (or an unrecorded) configuration, touching nothing."""
    if not directory.is_dir():
        return
    shards = sorted(directory.glob("shard-*.parquet"))
    others = [p for p in directory.iterdir() if not p.name.startswith(".") and p not in shards
              and p.name not in ("summary.json", "summary.png")]
    if others:
        raise TransferSetError(f"{directory} exists and is not empty but has no {MANIFEST}; "
                               "refusing to write a transfer set into it: choose an empty directory")
    if not shards:
        return
    foreign = []
    for p in shards:
        try:
            written_for = (pq.read_schema(p).metadata or {}).get(FINGERPRINT_KEY, b"").decode()
        except (pa.ArrowException, OSError):
            continue  # damaged: moved aside when the set is opened
        if written_for != fingerprint:
            foreign.append(p.name)
    if foreign:
        raise TransferSetError(
            f"{directory} has no {MANIFEST}, and its shards {foreign[:5]}{' ...' if len(foreign) > 5 else ''} were "
            f"made with another configuration (or by a version that did not record it), so the set cannot be "
            f"rebuilt for this one. It was not touched: choose another output.dir, or move the shards aside to make "
            f"the set anew: mkdir -p {directory}.old && mv {directory}/shard-*.parquet {directory}.old/")
    print(f"transfer set: {MANIFEST} was missing in {directory}; rebuilding it from its {len(shards)} shards",
          flush=True)


class TransferSetStore:
    """Writer side of a transfer-set directory."""

    def __init__(self, directory: Path, manifest: dict):
        self.directory = directory
        self.manifest = manifest

    @classmethod
    def open(cls, directory: str | Path, *, fingerprint: str, description: dict, num_shards: int) -> "TransferSetStore":
        """Create the directory, or reopen one made with the same fingerprint (resume).

        Raises :class:`TransferSetError` when the directory holds a set made with another
        configuration, or files that are not a transfer set; nothing there is touched then. A set
        with no shard written (neither listed nor on disk) takes the new configuration instead.
        """
        directory = Path(directory)
        path = directory / MANIFEST
        if path.is_file():
            manifest = read_manifest(directory)
            if manifest["fingerprint"] != fingerprint and not manifest["shards"] \
                    and not any(directory.glob("shard-*.parquet")):
                # Nothing written (a run that failed before its first shard): plan the set anew.
                manifest = {**manifest, "fingerprint": fingerprint, "description": description,
                            "num_shards": num_shards, "complete": False}
            if manifest["fingerprint"] != fingerprint:
                changes = diff_descriptions(manifest.get("description", {}), description)
                raise TransferSetError(
                    f"{directory} holds a transfer set made with a different configuration "
                    f"(fingerprint {manifest['fingerprint']} != {fingerprint}; changed: "
                    f"{'; '.join(changes[:8]) or 'unknown'}). It was not touched: choose another output.dir, "
                    "or delete that directory to make the set anew")
        else:
            _check_rebuild(directory, fingerprint)
            directory.mkdir(parents=True, exist_ok=True)
            manifest = {"format": FORMAT, "fingerprint": fingerprint, "description": description,
                        "num_shards": num_shards, "shards": {}, "complete": False}
        store = cls(directory, manifest)
        store._recover()
        return store

    def _recover(self) -> None:
        for tmp in self.directory.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        for f in sorted(self.directory.glob("shard-*.parquet")):
            key = f.name[len("shard-"):-len(".parquet")]
            problem = _shard_problem(f, listed=key in self.manifest["shards"])
            if problem:
                self._set_aside(f, key, problem)
                continue
            stats = read_shard_stats(f)
            if key not in self.manifest["shards"]:
                # Renamed (so complete) but the manifest update was lost: verify and adopt, with
                # the statistics the shard carries.
                table = pq.read_table(f)
                validate_table(table)
                self.manifest["shards"][key] = {**stats, "file": f.name, "rows": len(table)}
            elif stats and {**stats, "file": f.name} != self.manifest["shards"][key]:
                # Replaced (replace_shard) but the manifest update was lost: the file is the truth.
                self.manifest["shards"][key] = {**stats, "file": f.name}
        self._save()

    def _set_aside(self, path: Path, key: str, problem: str) -> None:
        """Move a damaged shard file to ``.damaged/`` (never over an earlier one) and unlist it, so
        its requests are made again."""
        aside = self.directory / DAMAGED
        aside.mkdir(exist_ok=True)
        dest, n = aside / path.name, 0
        while dest.exists():
            n += 1
            dest = aside / f"{path.name}.{n}"
        os.replace(path, dest)
        if self.manifest["shards"].pop(key, None) is not None:
            self.manifest["complete"] = False
        print(f"transfer set: {path} is not a readable shard ({problem}); moved to {dest}, its requests will be "
              "made again", flush=True)

    def _save(self) -> None:
        _atomic_write_bytes(self.directory / MANIFEST, json.dumps(self.manifest, indent=1, sort_keys=True).encode())

    @property
    def done(self) -> set[int]:
        return {int(k) for k in self.manifest["shards"]}

    @property
    def missing(self) -> list[int]:
        """The shards not written yet, in index order."""
        return [i for i in range(self.manifest["num_shards"]) if f"{i:05d}" not in self.manifest["shards"]]

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    def write_shard(self, index: int, table: pa.Table, stats: dict | None = None) -> Path:
        """Write shard ``index`` whole, then make it visible (file rename, then manifest)."""
        self._check_index(index)
        final = write_shard_file(self.directory, index, table, {**(stats or {}), "rows": len(table)})
        self.commit_shard(index, len(table), stats)
        return final

    def commit_shard(self, index: int, rows: int, stats: dict | None = None) -> None:
        """List a shard whose file :func:`write_shard_file` already made visible (driver side)."""
        self._check_index(index)
        self.manifest["shards"][f"{index:05d}"] = {"file": shard_name(index), "rows": rows, **(stats or {})}
        self._save()

    def replace_shard(self, index: int, table: pa.Table, stats: dict | None = None) -> None:
        """Atomically replace a listed shard's content and statistics (used to drop duplicates found
        across shards); ``stats`` default to the listed ones."""
        key = f"{index:05d}"
        entry = {**(stats if stats is not None else self.manifest["shards"][key]), "file": shard_name(index),
                 "rows": len(table)}
        write_shard_file(self.directory, index, table, entry)
        self.manifest["shards"][key] = entry
        self._save()

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self.manifest["num_shards"]:
            raise IndexError(f"shard {index} out of range 0..{self.manifest['num_shards'] - 1}")

    def finish(self, summary: dict | None = None) -> None:
        missing = sorted(set(range(self.manifest["num_shards"])) - self.done)
        if missing:
            raise TransferSetError(f"cannot finish {self.directory}: shards {missing[:10]} are not written")
        self.manifest["complete"] = True
        if summary is not None:
            self.manifest["summary"] = summary
        self._save()
