"""Distillation step: samples/s and model FLOPs utilisation at realistic shapes (one process, no Ray).

Two BERT-base-shaped teachers (12 layers x 768, random weights, saved to local directories and
loaded the way a job loads them: bf16 on CUDA), a student of 6 such layers, and StrataNet's step
exactly as a Ray Train worker runs it (:meth:`dfkd_ray.train.step.Distiller.step`: teachers -> RMD
confidences -> ST-amalg -> block loss (Eq. 7) + KD loss, AdamW) on transfer-like texts of about
``--words`` random words. Per (variant, batch size):

* ms a step and samples/s over ``--steps`` steps after ``--warmup`` (new texts every step), each batch
  tokenized in a background thread while the step before it runs, as training does
  (:meth:`~dfkd_ray.train.step.Distiller.encode`);
* model FLOPs per second: the teachers' forward passes plus the student's forward and backward
  (3 x its forward), counted on real tokens (padding excluded); ST-amalg, the projections and the
  confidence statistics are left out (well under 1% of a step). MFU is that rate over the bf16
  matmul rate measured in the same run (8192^3 products; on a CPU the float32 rate of 2048^3
  products, since CPUs without bf16 matrix units multiply bf16 a hundred times slower);
* the same number of steps again on batches tokenized beforehand: the step alone, without the
  tokenization it overlaps (when this is much faster, tokenization bounds the step);
* host synchronisations a step and the Python line that made each (CUDA:
  ``torch.cuda.set_sync_debug_mode``), and with ``--profile`` a
  torch.profiler table of the largest batch, the GPU's kernel time a step and its share of the
  profiled wall time (the profiler slows the host, so the share is a lower bound), and the Python
  functions that take the host's time over those steps (``cProfile``, batches tokenized beforehand).

    python benchmarks/distill_step.py --tokenizer ENCODER_DIR --batch-sizes 16,64,256 --out step.json \\
        --variants "fp32:train.matmul_precision=highest;tf32:train.matmul_precision=high;bf16:train.precision=bfloat16" --profile
    python benchmarks/distill_step.py --tokenizer ENCODER_DIR --tiny --device cpu          # CPU smoke test

``ENCODER_DIR`` is any local directory holding a BERT WordPiece tokenizer (e.g. the MiniLM
encoder); only its tokenizer is read. A variant is ``name:field=value,field=value`` with dotted
config fields (``name:`` alone runs the defaults).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from generation import host_reads, matmul_rate, sync, teacher_flops  # benchmarks/generation.py, beside this file
from harness.setup import parse_fields


def random_texts(vocab: list[str], n: int, words: int, seed: int) -> list[str]:
    """``n`` texts of 0.5-1.5 x ``words`` words drawn from ``vocab`` (so batches carry padding)."""
    rng = random.Random(seed)
    return [" ".join(rng.choices(vocab, k=rng.randint(max(1, words // 2), words + words // 2))) for _ in range(n)]


def build_models(tokenizer_dir: Path, root: Path, tiny: bool) -> tuple[dict[str, Path], Path, object]:
    """Two random BERT teachers (2 labels each) and a student encoder, saved under ``root``."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, BertModel

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    shape = (dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128) if tiny else
             dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072))
    student_layers = 2 if tiny else 6
    teachers = {}
    for i, (name, labels) in enumerate({"alpha": ["sports", "cooking"], "beta": ["space", "finance"]}.items()):
        torch.manual_seed(i)
        cfg = BertConfig(vocab_size=len(tok), max_position_embeddings=512, num_labels=2, pad_token_id=tok.pad_token_id,
                         id2label=dict(enumerate(labels)), label2id={x: j for j, x in enumerate(labels)}, **shape)
        teachers[name] = root / name
        BertForSequenceClassification(cfg).save_pretrained(teachers[name])
        tok.save_pretrained(teachers[name])
    torch.manual_seed(2)
    student_cfg = BertConfig(vocab_size=len(tok), max_position_embeddings=512, pad_token_id=tok.pad_token_id,
                             **{**shape, "num_hidden_layers": student_layers})
    student = root / "student"
    BertModel(student_cfg).save_pretrained(student)
    tok.save_pretrained(student)
    return teachers, student, tok


def job_config(teachers: dict[str, Path], student: Path, batch: int, fields: dict, out: Path, max_length: int):
    from dfkd_ray.config import validate_config
    from dfkd_ray.tuning.space import set_dotted

    data = {"name": "distill-step", "seed": 0,
            "teachers": [{"name": n, "path": str(p), "max_length": max_length} for n, p in teachers.items()],
            "transfer": {"source": "random_words"},
            "student": {"path": str(student), "max_length": max_length},
            "train": {"batch_size": batch, "epochs": 1, "warmup_epochs": 0},
            "output": {"dir": str(out)}}
    for dotted, value in fields.items():
        set_dotted(data, dotted, value)
    return validate_config(data, source="distill_step benchmark")


def parse_variants(text: str) -> list[tuple[str, dict]]:
    """``"name:field=value,...;name2:..."`` -> [(name, {dotted field: value})] (numbers and booleans parsed)."""
    variants = []
    for item in filter(None, (x.strip() for x in text.split(";"))):
        name, _, body = item.partition(":")
        variants.append((name.strip(), parse_fields(body, f"--variants {name.strip()!r}")))
    return variants


def step_flops(tok, texts: list[str], max_length: int, teacher_cfg, student_cfg) -> float:
    """Model FLOPs of one step on ``texts`` (real tokens): two teacher forwards + student forward and backward."""
    lengths = [len(x) for x in tok(texts, truncation=True, max_length=max_length)["input_ids"]]
    tokens, tokens_sq = float(sum(lengths)), float(sum(n * n for n in lengths))
    teachers = 2 * teacher_flops(teacher_cfg, tokens, tokens_sq, len(texts))
    H, I, L = student_cfg.hidden_size, student_cfg.intermediate_size, student_cfg.num_hidden_layers
    student = L * (8 * H * H + 4 * H * I) * tokens + L * 4 * H * tokens_sq
    return teachers + 3 * student


def compile_counters() -> dict[str, int]:
    """torch.compile's counters of this process so far (e.g. ``cudagraph_skips``: compiled graphs that
    ``reduce-overhead`` could not replay as CUDA graphs)."""
    from torch._dynamo.utils import counters

    return dict(counters["inductor"])


def run_steps(distiller, batches: list[list[str]]) -> None:
    """One step on each batch, the next batch tokenized meanwhile (a package without
    ``Distiller.encode`` tokenizes inside each step)."""
    from dfkd_ray.train.epochs import prefetch

    encode = getattr(distiller, "encode", None)
    for batch in (batches if encode is None else prefetch((encode(b) for b in batches), size=1)):
        distiller.step(batch)


def count_syncs(distiller, texts: list[str], device: torch.device) -> dict[str, int] | None:
    """Host synchronisations of one step (CUDA only), counted by the Python line that made each."""
    if device.type != "cuda":
        return None
    batch = distiller.encode(texts) if hasattr(distiller, "encode") else texts
    return host_reads(lambda: distiller.step(batch))


def encoded_steps(distiller, encoded: list, device: torch.device) -> float:
    """Seconds of the steps on ``encoded`` (batches from ``distiller.encode``, tokenized before the
    clock starts): the step alone, without the tokenization that overlaps it in training."""
    sync(device)
    t0 = time.perf_counter()
    for batch in encoded:
        distiller.step(batch)
    sync(device)
    return time.perf_counter() - t0


def host_profile(distiller, batches: list[list[str]], device: torch.device, rows: int = 25) -> str:
    """The Python functions that take the host's time over steps on ``batches`` (tokenized beforehand),
    by their own time (``cProfile``)."""
    import cProfile
    import io
    import pstats

    encoded = [distiller.encode(b) for b in batches]  # outside the profile: the steps alone
    with cProfile.Profile() as prof:
        encoded_steps(distiller, encoded, device)
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(rows)
    return text.getvalue()


def profile_steps(distiller, batches: list[list[str]], device: torch.device) -> dict:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        run_steps(distiller, batches)
        sync(device)
    wall = time.perf_counter() - t0
    events = prof.key_averages()
    # kernel time: the GPU's own events only (an operator's row repeats the time of the kernels it launched)
    busy = (sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA) / 1e6
            if device.type == "cuda" else None)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    return {"steps": len(batches), "wall_s": wall, "gpu_ms_per_step": None if busy is None else 1e3 * busy / len(batches),
            "gpu_busy_share": None if busy is None else busy / wall,
            "table": events.table(sort_by=key, row_limit=18, max_name_column_width=55)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", type=Path, required=True, help="a local directory with a BERT WordPiece tokenizer")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="2-layer 64-wide models (CPU smoke test)")
    ap.add_argument("--batch-sizes", default="16,64,256")
    ap.add_argument("--variants", default="default:", help="name:field=value,...;name:... (dotted config fields)")
    ap.add_argument("--words", type=int, default=40, help="mean words a text (0.5-1.5 x)")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--profile", action="store_true", help="profile the largest batch of every variant")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    from transformers import AutoConfig

    from dfkd_ray.confidence import fit_estimators
    from dfkd_ray.models.teacher import load_teachers
    from dfkd_ray.train.epochs import StepPlan
    from dfkd_ray.train.step import Distiller

    device = torch.device(args.device)
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    variants = parse_variants(args.variants)
    peak_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = matmul_rate(device, 2048 if args.tiny or device.type == "cpu" else 8192, peak_dtype)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        teacher_dirs, student_dir, tok = build_models(args.tokenizer, root, args.tiny)
        vocab = [w for w in tok.get_vocab() if w.isalpha() and len(w) > 2]
        teacher_cfg, student_cfg = AutoConfig.from_pretrained(teacher_dirs["alpha"]), AutoConfig.from_pretrained(student_dir)
        base = job_config(teacher_dirs, student_dir, sizes[0], {}, root / "out", args.max_length)
        # the student keeps all its layers, one block each (N = its depth), as a job's student does
        teachers = load_teachers(base.teachers, num_blocks=student_cfg.num_hidden_layers, device=device)
        heldout = {n: random_texts(vocab, 200, args.words, seed=i) for i, n in enumerate(teachers)}
        estimators = fit_estimators(teachers, heldout, None, base.amalgamation, seed=0)
        for name, fields in variants:
            for b in sizes:
                cfg = job_config(teacher_dirs, student_dir, b, fields, root / "out", args.max_length)
                n_batches = args.warmup + args.steps + 1
                texts = random_texts(vocab, b * n_batches, args.words, seed=1000 + b)
                batches = [texts[i * b:(i + 1) * b] for i in range(n_batches)]
                distiller = Distiller(cfg, StepPlan.of(len(texts), cfg, 1), device=device, teachers=teachers,
                                      estimators=estimators)
                t0 = time.perf_counter()
                run_steps(distiller, batches[:args.warmup])  # with train.compile, the compilation happens here
                sync(device)
                warmup = time.perf_counter() - t0
                t0 = time.perf_counter()
                run_steps(distiller, batches[args.warmup:-1])
                sync(device)
                wall = time.perf_counter() - t0
                step_only = encoded_steps(distiller, [distiller.encode(b) for b in batches[args.warmup:-1]], device)
                flops = sum(step_flops(tok, batch, args.max_length, teacher_cfg, student_cfg)
                            for batch in batches[args.warmup:-1])
                sites = count_syncs(distiller, batches[-1], device)
                row = {"variant": name, "fields": fields, "batch": b, "ms_per_step": 1e3 * wall / args.steps,
                       "warmup_s": warmup, "step_only_ms": 1e3 * step_only / args.steps,
                       "cudagraph_skips": compile_counters().get("cudagraph_skips", 0),
                       "samples_per_s": b * args.steps / wall, "tflops": flops / wall / 1e12,
                       "mfu": flops / wall / peak, "syncs_per_step": None if sites is None else sum(sites.values()),
                       "sync_sites": sites}
                if args.profile and b == max(sizes):
                    row["profile"] = profile_steps(distiller, batches[args.warmup:args.warmup + 10], device)
                    row["profile"]["host"] = host_profile(distiller, batches[args.warmup:args.warmup + 5], device)
                rows.append(row)
                print(f"{name:>10} B={b:<4} {row['ms_per_step']:8.1f} ms/step {row['samples_per_s']:8.1f} samples/s "
                      f"{row['tflops']:7.2f} TFLOP/s  MFU {100 * row['mfu']:5.1f}%  "
                      f"syncs/step {row['syncs_per_step']}  warmup {warmup:.1f} s  "
                      f"tokenized beforehand {row['step_only_ms']:.1f} ms/step",
                      flush=True)
                del distiller
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    print(f"\n{str(peak_dtype).removeprefix('torch.')} matmul rate (same run): {peak / 1e12:.1f} TFLOP/s on {device}"
          f"{' ' + torch.cuda.get_device_name(device) if device.type == 'cuda' else ''}")
    print("| variant | batch | ms/step | samples/s | model TFLOP/s | MFU | syncs/step | GPU kernel ms/step | warmup s "
          "| ms/step, tokenized beforehand |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        gpu = r.get("profile", {}).get("gpu_ms_per_step")
        print(f"| {r['variant']} | {r['batch']} | {r['ms_per_step']:.1f} | {r['samples_per_s']:.1f} | {r['tflops']:.2f} "
              f"| {100 * r['mfu']:.1f}% | {r['syncs_per_step']} | {'-' if gpu is None else f'{gpu:.1f}'} "
              f"| {r['warmup_s']:.1f} | {r['step_only_ms']:.1f} |")
    for r in rows:
        if r["sync_sites"] and r["batch"] == max(sizes):
            print(f"\nhost reads of one step, {r['variant']}, batch {r['batch']}: " +
                  ", ".join(f"{where} x{n}" for where, n in r["sync_sites"].items()))
    for r in rows:
        if "profile" in r:
            print(f"\nprofile: {r['variant']}, batch {r['batch']}, {r['profile']['steps']} steps in "
                  f"{r['profile']['wall_s']:.2f} s\n{r['profile']['table']}\nhost, 5 steps:\n{r['profile']['host']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        args.out.write_text(json.dumps({"device": device_name, "torch": torch.__version__, "matmul_tflops": peak / 1e12,
                                        "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
