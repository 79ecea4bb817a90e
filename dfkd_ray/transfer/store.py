"""Transfer sets on disk: Parquet shards plus a manifest, complete shards only.

Layout of a transfer-set directory::

    manifest.json          format, fingerprint, the config that made it, shard list, complete flag
    shard-00000.parquet    one per shard of the requests table, written whole then renamed
    .shard-00001.parquet.<pid>.tmp   a shard being written (hidden: no reader picks it up)

A shard becomes visible only when complete: it is written under a hidden temporary name,
flushed to disk, then renamed (atomic on POSIX); the manifest is replaced the same way and lists
complete shards only. A process killed at any point leaves at most a temporary file, which the
next :meth:`TransferSetStore.open` deletes, and perhaps a renamed shard the manifest does not list
yet, which it verifies and adopts. A directory made with a different configuration is refused
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
    if stats:
        meta = {**{k: v for k, v in stats.items() if k != "file"}, "rows": len(table)}
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), STATS_KEY: json.dumps(meta).encode()})
    pq.write_table(table, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    return final


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
            if directory.is_dir() and any(p for p in directory.iterdir() if not p.name.startswith(".")):
                raise TransferSetError(f"{directory} exists and is not empty but has no {MANIFEST}; "
                                       "refusing to write a transfer set into it: choose an empty directory")
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
