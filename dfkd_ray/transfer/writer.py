"""Write a transfer set: requests -> source -> filtered Parquet shards.

Both ways of making a job's set share what is here: its plan (requests cut into shards, and the
description whose hash is the set's fingerprint), :func:`open_transfer_set`, the one loop that
fills requests with rows that pass the filters (:func:`fill_requests`), and the final pass over the
written shards (rows duplicated across shards, summary, empty classes). The Ray Data pipeline
(:mod:`dfkd_ray.orchestration.generate`) spreads the shards over actors; :func:`write_transfer_set`
makes the same set in this process (the reference, and what a laptop or a test uses). Both resume:
shards already in the manifest are skipped, so rerunning after a kill finishes the set.
"""

from __future__ import annotations

import os
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq

from dfkd_ray.config import JobConfig
from dfkd_ray.labels import UnionLabelSpace
from dfkd_ray.stages import fingerprint
from dfkd_ray.transfer.filters import Deduplicator
from dfkd_ray.transfer.requests import Request, build_requests, heldout_part, retry_request
from dfkd_ray.transfer.schema import rows_to_table
from dfkd_ray.transfer.store import TransferSetStore, read_manifest

Part = Literal["all", "heldout"]
"""Which requests of each shard a store holds: all of them, or only the held-out ones (the
held-out pass of streaming mode, :mod:`dfkd_ray.orchestration.streaming`)."""

HELDOUT_PASS_DIR = "heldout_pass"
"""Under ``output.dir``: the held-out pass, one shard per transfer-set shard (its held-out requests)."""


def transfer_set_dir(cfg: JobConfig) -> Path:
    return cfg.output.dir / "transfer_set"


def heldout_pass_dir(cfg: JobConfig) -> Path:
    return cfg.output.dir / HELDOUT_PASS_DIR


# Settings that pick kernels or schedule GPU work, not content, and stay out of the fingerprint like
# the device does: a set made before such a field existed, or resumed with another value of it, is
# still the same set.
_KERNEL_ONLY_STEERED_KEYS = ("sdpa", "decode_parts")


# Sources whose config sections came after sets of the other sources existed: left out of those sets'
# descriptions, so their fingerprints (and the runs resumed from them) stay what they were.
_LATER_SOURCES = ("prompt_tuned", "embedding_guessing")


def transfer_description(cfg: JobConfig, teacher_labels: dict[str, list[str]]) -> dict:
    """Everything that decides a transfer set's content; its hash is the set's fingerprint."""
    transfer = cfg.transfer.model_dump(mode="json")
    for key in _KERNEL_ONLY_STEERED_KEYS:
        transfer["steered"].pop(key, None)
    if transfer["corpus"]["encoding"] == "utf-8":  # how every set was read before the setting existed
        del transfer["corpus"]["encoding"]
    if transfer["steered"]["candidate_mass"] == 1.0:  # how every set was steered before the setting existed
        del transfer["steered"]["candidate_mass"]
    for source in _LATER_SOURCES:  # their settings decide nothing for another source's set
        if cfg.transfer.source != source:
            transfer.pop(source, None)
    return {
        "seed": cfg.seed,
        "teachers": {t.name: {"path": str(Path(t.path).resolve()), "labels": teacher_labels[t.name],
                              "max_length": t.max_length} for t in cfg.teachers},
        "transfer": transfer,
    }


def plan_transfer_set(cfg: JobConfig, part: Part = "all") -> tuple[UnionLabelSpace, list[list[Request]], dict]:
    """The label space, the requests cut into shards, and the set's description.

    ``part="heldout"``: each shard keeps only its held-out requests, and the description says so.
    """
    teacher_labels = cfg.teacher_labels()
    space = UnionLabelSpace.from_teachers(teacher_labels)
    requests = build_requests(teacher_labels, space, samples_per_class=cfg.transfer.samples_per_class,
                              job_seed=cfg.seed, class_weights=cfg.transfer.class_weights)
    size = cfg.transfer.shard_size
    shards = [requests[i:i + size] for i in range(0, len(requests), size)]
    description = transfer_description(cfg, teacher_labels)
    if part == "heldout":
        shards = [heldout_part(s, cfg.transfer.heldout_fraction) for s in shards]
        description = {**description, "part": "heldout"}
    return space, shards, description


def open_transfer_set(cfg: JobConfig, directory: str | Path | None = None,
                      part: Part = "all") -> tuple[TransferSetStore, list[list[Request]], UnionLabelSpace]:
    """Plan the set of ``cfg`` and open its store in ``directory`` (default: the job's transfer set,
    or its held-out pass for ``part="heldout"``): a new one, or the one a run with the same
    description began (shards written but not listed are adopted). Returns the store, the shards'
    requests and the label space. Raises :class:`~dfkd_ray.transfer.store.TransferSetError` when
    the directory holds another configuration's set, or files that are not a transfer set.
    """
    space, shards, description = plan_transfer_set(cfg, part)
    if directory is None:
        directory = heldout_pass_dir(cfg) if part == "heldout" else transfer_set_dir(cfg)
    store = TransferSetStore.open(directory, fingerprint=fingerprint(description), description=description,
                                  num_shards=len(shards))
    return store, shards, space


class TransferSetEmpty(ValueError):
    """Filtering left a class (or the whole set) without rows: never hand that to training."""


@dataclass
class Filled:
    """What :func:`fill_requests` made of a list of requests."""

    rows: list[dict] = field(default_factory=list)
    """The rows that passed, one per request at most, in request order."""
    given_up: list[Request] = field(default_factory=list)
    """Requests still without a row after the last attempt."""
    generated: int = 0
    rejects: Counter = field(default_factory=Counter)
    """Rejected rows by reason: ``low_confidence``, ``duplicate``."""
    rejected_confidence: list[float] = field(default_factory=list)
    """The confidences of the rows rejected as ``low_confidence`` (rounded)."""


def fill_requests(source, requests: list[Request], attempts: range, *, min_confidence: float,
                  dedup: Deduplicator) -> Filled:
    """Ask ``source`` for one row per request and retry the rejected requests, each ``attempt`` with
    that attempt's seed (:func:`~dfkd_ray.transfer.requests.retry_request`), until every request
    has a row or the attempts are spent. A row is rejected when the teacher's confidence is under
    ``min_confidence`` or ``dedup`` has seen its text (rows that pass are added to ``dedup``)."""
    filled = Filled()
    kept: dict[int, dict] = {}
    pending = list(enumerate(requests))
    for attempt in attempts:
        if not pending:
            break
        rows = source.generate([retry_request(r, attempt) for _, r in pending])
        filled.generated += len(rows)
        still = []
        for (pos, r), row in zip(pending, rows):
            if row["confidence"] < min_confidence:
                filled.rejects["low_confidence"] += 1
                filled.rejected_confidence.append(round(row["confidence"], 4))
                still.append((pos, r))
            elif dedup.is_duplicate(row["text"]):
                filled.rejects["duplicate"] += 1
                still.append((pos, r))
            else:
                kept[pos] = row
        pending = still
    filled.rows = [kept[p] for p in sorted(kept)]
    filled.given_up = [r for _, r in pending]
    return filled


def make_shard(source, requests: list[Request], cfg: JobConfig) -> tuple[pa.Table, dict]:
    """Make one shard: :func:`fill_requests` with ``transfer.max_attempts`` attempts, duplicates
    looked for within the shard.

    Returns the table (rows in request order) and stats: requests, rows, generated, given_up,
    rejects by reason, the confidences of rejected rows (rounded), seconds and the worker
    (``host:pid``) that made it.
    """
    t = cfg.transfer
    start = time.perf_counter()
    filled = fill_requests(source, requests, range(t.max_attempts), min_confidence=t.min_confidence,
                           dedup=Deduplicator(t.dedup, t.near_duplicate_threshold))
    table = rows_to_table(filled.rows)
    stats = {"requests": len(requests), "rows": len(table), "generated": filled.generated,
             "given_up": len(filled.given_up), "rejects": dict(filled.rejects),
             "rejected_confidence": filled.rejected_confidence,
             "seconds": round(time.perf_counter() - start, 4), "worker": f"{socket.gethostname()}:{os.getpid()}"}
    return table, stats


def find_cross_shard_duplicates(store: TransferSetStore, cfg: JobConfig) -> dict[int, list[str]]:
    """Rows that repeat a row of an earlier shard (first occurrence wins): shard -> their sample_ids.

    Shards are filtered independently (in parallel actors), so only this pass, in shard order, sees
    duplicates across them. Deterministic: the same shards give the same answer on every run.
    """
    dedup = Deduplicator(cfg.transfer.dedup, cfg.transfer.near_duplicate_threshold)
    found: dict[int, list[str]] = {}
    if cfg.transfer.dedup == "none":
        return found
    for key in sorted(store.manifest["shards"]):
        table = pq.read_table(store.directory / store.manifest["shards"][key]["file"], columns=["sample_id", "text"])
        ids = table.column("sample_id").to_pylist()
        dups = [i for i, text in zip(ids, table.column("text").to_pylist()) if dedup.is_duplicate(text)]
        if dups:
            found[int(key)] = dups
    return found


def regenerate_duplicates(source, cfg: JobConfig, directory: str | Path, duplicates: dict[int, list[str]]) -> dict:
    """New rows for the requests whose rows :func:`find_cross_shard_duplicates` dropped.

    Each such request is retried with the seeds of attempts ``max_attempts .. 2 * max_attempts - 1``
    (attempts below ``max_attempts`` already ran in its shard) until a row passes
    ``min_confidence`` and is new against every row of the set, kept and regenerated alike.
    Reads the shards itself, so on a cluster it runs where the generator can (one Ray task) and
    returns only the new rows. Returns ``{shard: {"rows": [row dicts], "given_up": n, "rejects": {...}}}``.
    """
    t = cfg.transfer
    directory = Path(directory)
    _, shards, _ = plan_transfer_set(cfg)
    manifest = read_manifest(directory)
    dedup = Deduplicator(t.dedup, t.near_duplicate_threshold)
    for key in sorted(manifest["shards"]):  # the kept rows, in the order the scan saw them
        dropped = set(duplicates.get(int(key), ()))
        table = pq.read_table(directory / manifest["shards"][key]["file"], columns=["sample_id", "text"])
        for sid, text in zip(table.column("sample_id").to_pylist(), table.column("text").to_pylist()):
            if sid not in dropped:
                dedup.is_duplicate(text)
    out = {}
    for index in sorted(duplicates):
        by_id = {r.sample_id: r for r in shards[index]}
        filled = fill_requests(source, [by_id[sid] for sid in duplicates[index]],
                               range(t.max_attempts, 2 * t.max_attempts), min_confidence=t.min_confidence, dedup=dedup)
        out[index] = {"rows": filled.rows, "given_up": len(filled.given_up), "rejects": dict(filled.rejects)}
    return out


def repair_cross_shard_duplicates(store: TransferSetStore, cfg: JobConfig, regenerate) -> int:
    """Find rows duplicated across shards and replace them with regenerated rows; returns how many.

    ``regenerate(duplicates) -> {shard: {"rows", "given_up", "rejects"}}`` is
    :func:`regenerate_duplicates` bound to a source (in this process, or a Ray task). Each repaired
    shard is replaced whole (atomic rename), rows kept in request order. Killed halfway, a rerun
    finds only the shards not yet replaced (regenerated rows are new against the whole set).
    """
    duplicates = find_cross_shard_duplicates(store, cfg)
    if not duplicates:
        return 0
    _, shards, _ = plan_transfer_set(cfg)
    repairs = regenerate(duplicates)
    for index, dropped in sorted(duplicates.items()):
        fix = repairs[index]
        key = f"{index:05d}"
        table = pq.read_table(store.directory / store.manifest["shards"][key]["file"])
        drop = set(dropped)
        kept = table.filter(pa.array([sid not in drop for sid in table.column("sample_id").to_pylist()], pa.bool_()))
        merged = pa.concat_tables([kept, rows_to_table(fix["rows"])]) if fix["rows"] else kept
        order = {r.sample_id: i for i, r in enumerate(shards[index])}
        ids = merged.column("sample_id").to_pylist()
        # Typed indices: a shard left with no row (every one repeated, none refilled) takes an empty list.
        merged = merged.take(pa.array(sorted(range(len(ids)), key=lambda i: order[ids[i]]), pa.int64()))
        stats = dict(store.manifest["shards"][key])
        stats["given_up"] = stats.get("given_up", 0) + fix["given_up"]
        rejects = Counter(stats.get("rejects", {}))
        rejects.update(fix["rejects"])
        rejects["duplicate_across_shards"] += len(dropped)
        stats["rejects"] = dict(rejects)
        stats["generated"] = stats.get("generated", 0) + len(fix["rows"]) + sum(fix["rejects"].values())
        store.replace_shard(index, merged, stats)
    return sum(len(v) for v in duplicates.values())


def finalize_transfer_set(store: TransferSetStore, cfg: JobConfig, *, regenerate=None,
                          wall_seconds: float | None = None, generated_now: int = 0) -> dict:
    """Replace rows duplicated across shards, summarise, refuse empty classes, finish.

    ``regenerate`` makes the replacement rows (see :func:`repair_cross_shard_duplicates`); without
    it duplicated rows are dropped and counted as given up. Idempotent: after a kill anywhere in
    here, running it again gives the same set.
    """
    from dfkd_ray.transfer.sources import get_source_class
    from dfkd_ray.transfer.summary import SummaryAccumulator, format_table, write_summary

    t = cfg.transfer
    if regenerate is None:
        def regenerate(duplicates):  # noqa: E306 - drop, count as given up
            return {i: {"rows": [], "given_up": len(ids), "rejects": {}} for i, ids in duplicates.items()}
    repair_cross_shard_duplicates(store, cfg, regenerate)
    acc = SummaryAccumulator()
    for key in sorted(store.manifest["shards"]):
        acc.add(pq.read_table(store.directory / store.manifest["shards"][key]["file"]))
    shards = store.manifest["shards"].values()
    rejects: Counter = Counter()
    for s in shards:
        rejects.update(s.get("rejects", {}))
    rejected_conf = sorted(c for s in shards for c in s.get("rejected_confidence", []))
    summary = acc.result()
    summary.update({
        "rejects": dict(rejects),
        "requests": sum(s.get("requests", 0) for s in shards),
        "given_up": sum(s.get("given_up", 0) for s in shards),
        "generator_seconds": round(sum(s.get("seconds", 0.0) for s in shards), 3),
        "samples_per_s": round(generated_now / wall_seconds, 3) if wall_seconds and generated_now else None,
        "source": t.source,
    })
    _check_not_empty(summary, cfg, rejected_conf, targeted=get_source_class(t.source).targeted)
    write_summary(summary, store.directory)
    store.finish(summary)
    print(format_table(summary))
    return summary


def _check_not_empty(summary: dict, cfg: JobConfig, rejected_conf: list[float], *, targeted: bool) -> None:
    t = cfg.transfer

    def observed() -> str:
        if not rejected_conf:
            return "no rows were rejected for confidence"
        q = lambda f: rejected_conf[min(int(f * len(rejected_conf)), len(rejected_conf) - 1)]  # noqa: E731
        return (f"rejected confidences: min {rejected_conf[0]:.3f}, median {q(0.5):.3f}, "
                f"max {rejected_conf[-1]:.3f} over {len(rejected_conf)} tries")

    if summary["rows"] == 0:
        raise TransferSetEmpty(f"every sample was rejected (transfer.min_confidence={t.min_confidence}, "
                               f"rejects {summary['rejects']}); {observed()}. Lower transfer.min_confidence, raise "
                               "transfer.max_attempts or strengthen the source; the set was not marked complete")
    if targeted:
        have = {(r["teacher"], r["label"]) for r in summary["per_class"] if r["rows"] > 0}
        empty = [f"{tc.name}:{lbl}" for tc in cfg.teachers for lbl in cfg.teacher_labels()[tc.name]
                 if (tc.name, _global_name(cfg, tc.name, lbl)) not in have]
        if empty:
            raise TransferSetEmpty(f"classes {empty} have no rows after filtering (transfer.min_confidence="
                                   f"{t.min_confidence}); {observed()}. Lower transfer.min_confidence or raise "
                                   "transfer.max_attempts; the set was not marked complete")


def _global_name(cfg: JobConfig, teacher: str, label: str) -> str:
    space = UnionLabelSpace.from_teachers(cfg.teacher_labels())
    return space.names[space.teacher_to_global[teacher][cfg.teacher_labels()[teacher].index(label)]]


def write_transfer_set(cfg: JobConfig, directory: str | Path | None = None, *, device: str = "cpu",
                       progress: bool = True) -> Path:
    """Make (or finish) the transfer set of ``cfg`` in this process; returns its directory."""
    from tqdm.auto import tqdm

    from dfkd_ray.transfer.sources import build_source

    store, shards, space = open_transfer_set(cfg, directory)
    if store.complete:
        return store.directory
    start, generated = time.perf_counter(), 0
    source = None

    def make_source():
        nonlocal source
        if source is None:
            source = build_source(cfg, space, device=device)
        return source

    if store.missing:
        bar = tqdm(store.missing, desc=f"transfer set ({cfg.transfer.source})", unit="shard", disable=not progress)
        for i in bar:
            table, stats = make_shard(make_source(), shards[i], cfg)
            store.write_shard(i, table, stats)
            generated += stats["generated"]
            bar.set_postfix(per_s=f"{generated / (time.perf_counter() - start):.1f}")
    summary = finalize_transfer_set(
        store, cfg, wall_seconds=time.perf_counter() - start, generated_now=generated,
        regenerate=lambda duplicates: regenerate_duplicates(make_source(), cfg, store.directory, duplicates))
    print(final_line(summary, store.directory))
    return store.directory


def final_line(summary: dict, directory: Path) -> str:
    rej = sum(summary["rejects"].values())
    rate = f", {summary['samples_per_s']:.1f} samples/s" if summary.get("samples_per_s") else ""
    return (f"transfer set: {summary['rows']} rows from {summary['requests']} requests, {rej} rejected "
            f"({', '.join(f'{k} {v}' for k, v in sorted(summary['rejects'].items())) or 'none'}), "
            f"{summary['given_up']} given up{rate} -> {directory}")
