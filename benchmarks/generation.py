"""Throughput of teacher-steered decoding (StrataNet Eq. 1): unguided vs guided vs a naive reference.

A GPT-2-small-shaped LM (12 x 768) and a BERT-base-shaped teacher (12 x 768, 2 classes), random
weights (speed does not depend on them), real tokenizers: the LM's is the fixture GPT-2 byte-level
BPE (12,288 tokens), the teacher's the MiniLM WordPiece (12,288 entries). With random weights the
LM's top-m tokens are close to uniform over the vocabulary: the tokenizer load is a worst case
(few repeated words, ~40% of candidates continue a word).

Reported per run: samples/s and LM tokens/s over wall time; for guided runs the teacher's useful
FLOPs (real tokens only) per wall second as a fraction of the bf16 matmul rate measured in the same
run, the same over the time any teacher forward was running (CUDA events), padding overhead and
CPU token-map time.
The naive reference guides one sequence at a time and re-tokenizes every candidate's full text.

GPU, from the repository root (``--tokenizers DIR`` holds ``lm/`` and ``teacher/`` tokenizer files;
default: ``generation_bench`` in the repository's git-ignored ``.carry`` folder):
    python benchmarks/generation.py --out results/generation.json
    python benchmarks/generation.py --plan key --batching uniform --compare batching --out results/key.json
    python benchmarks/generation.py --plan key --compare parts --out results/parts.json
    python benchmarks/generation.py --plan one --parts 2 --compare parts --out results/one.json
    python benchmarks/generation.py --plan wide --parts 2 --compare parts --out results/wide.json
The comparison runs repeat the largest guided runs with the other ``sdpa`` (``--compare
sdpa``, default), the other teacher batching (``--compare batching``) or two interleaved decoding
parts against one (``--compare parts``). Before the runs, ``decode_parts=2`` is
checked against each part decoded alone (the same tokens are expected).
CPU smoke test (tiny shapes):
    python benchmarks/generation.py --tiny --device cpu
Imports torch, transformers, tokenizers and dfkd_ray's config, math and generation modules only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from dfkd_ray.config import SteeredConfig
from dfkd_ray.generation.hf import SteeredGenerator
from dfkd_ray.generation.steering import GenerationRequest
from dfkd_ray.models.teacher import Teacher

HERE = Path(__file__).resolve().parents[1]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device, n: int, dtype=torch.bfloat16, reps: int = 10) -> float:
    """FLOP/s of an n x n x n matrix product (mean of ``reps`` after 3 warm-ups, random data)."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def teacher_flops(cfg, tokens: float, tokens_sq: float, sequences: float) -> float:
    """Forward FLOPs of a BERT encoder + classifier: dense layers per token, attention per token pair."""
    H, I, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    per_token = L * (8 * H * H + 4 * H * I)  # QKV + output projection + FFN, 2 FLOPs per multiply-add
    attention = L * 4 * H * tokens_sq  # Q K^T and A V
    head = sequences * (2 * H * H + 2 * H * cfg.num_labels)  # pooler + classifier
    return per_token * tokens + attention + head


def build(args, device: torch.device):
    from transformers import (AutoTokenizer, BertConfig, BertForSequenceClassification, GPT2Config,
                              GPT2LMHeadModel)

    tok_dir = Path(args.tokenizers)
    lm_tok = AutoTokenizer.from_pretrained(tok_dir / "lm")
    t_tok = AutoTokenizer.from_pretrained(tok_dir / "teacher")
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.tiny:
        lm_cfg = dict(n_embd=64, n_layer=2, n_head=2)
        t_cfg = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
    else:  # GPT-2 small body; BERT-base
        lm_cfg = dict(n_embd=768, n_layer=12, n_head=12)
        t_cfg = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=len(lm_tok), n_positions=1024, bos_token_id=lm_tok.bos_token_id,
                                    eos_token_id=lm_tok.eos_token_id, **lm_cfg))
    cfg = BertConfig(vocab_size=len(t_tok), max_position_embeddings=512, num_labels=2,
                     id2label={0: "business", 1: "sports"}, label2id={"business": 0, "sports": 1},
                     pad_token_id=t_tok.pad_token_id, **t_cfg)
    model = BertForSequenceClassification(cfg).to(device=device, dtype=dtype)
    teacher = Teacher(name="bert", model=model, tokenizer=t_tok, labels=["business", "sports"], num_blocks=1,
                      max_length=args.teacher_max_length)
    return lm, lm_tok, teacher, cfg


def guided_params(m: int, tokens: int, batch: int, *, strength: float = 8.0, top_k: int = 50, **extra) -> SteeredConfig:
    """The benchmarks' decoding settings: top-k = min(m, top_k), top-p 0.9, exactly ``tokens`` new tokens a row."""
    return SteeredConfig(control_strength=strength, top_m=m, top_k=min(m, top_k), top_p=0.9, max_new_tokens=tokens,
                         min_new_tokens=tokens, batch_size=batch, **extra)


def run_one(lm, lm_tok, teacher, cfg, device, *, label: str, batch: int, samples: int, m: int, lam: float,
            token_map: str, args, peak: float, batching: str = "padded", sdpa: str = "no_cudnn",
            parts: int = 1) -> dict:
    params = guided_params(m, args.tokens, batch, strength=lam, top_k=args.top_k,
                           teacher_chunk_tokens=args.chunk_tokens, token_map=token_map, teacher_batching=batching,
                           sdpa=sdpa, decode_parts=parts)
    gen = SteeredGenerator(lm, lm_tok, {"bert": teacher}, params, device=device)
    reqs = [GenerationRequest("bert", i % 2, seed=7919 * i + 1) for i in range(samples)]
    gen.generate(reqs[:min(batch, 4)])  # warm-up: token map, kernels
    sync(device)
    t0 = time.perf_counter()
    results = gen.generate(reqs)
    sync(device)
    wall = time.perf_counter() - t0
    st = gen.stats
    lm_tokens = sum(r.num_tokens for r in results)
    row = {"run": label, "batch": batch, "samples": samples, "m": m if lam else None,
           "k": params.top_k, "lambda": lam, "token_map": token_map,
           "batching": batching if lam and token_map != "exact" else None,
           "sdpa": sdpa if lam else None, "parts": min(parts, batch),
           "wall_s": wall,
           "samples_per_s": samples / wall, "tokens_per_s": lm_tokens / wall, "lm_tokens": lm_tokens,
           "teacher_forwards": st.teacher_forwards, "teacher_sequences": st.teacher_sequences,
           "teacher_tokens": st.teacher_tokens, "teacher_padded_tokens": st.teacher_padded_tokens,
           "teacher_seconds": st.teacher_seconds, "teacher_busy_seconds": st.teacher_busy_seconds,
           "token_map_seconds": st.tokenizer_seconds}
    if lam:
        useful = teacher_flops(cfg, st.teacher_tokens, st.teacher_tokens_sq, st.teacher_sequences)
        row["teacher_tflops"] = useful / 1e12
        row["teacher_frac_of_peak_wall"] = useful / wall / peak
        # over the time any teacher forward ran (parts on separate streams may overlap forwards)
        row["teacher_frac_of_peak_in_forward"] = useful / max(st.teacher_busy_seconds, 1e-9) / peak
        row["padding_overhead"] = st.teacher_padded_tokens / max(st.teacher_tokens, 1) - 1
        row["teacher_share_of_wall"] = st.teacher_busy_seconds / wall
    example = results[0].text
    row["example"] = example[:120]
    return row


def check_parts(lm, lm_tok, teacher, device, *, rows: int, tokens: int, m: int = 50) -> dict:
    """Interleaved parts (``decode_parts=2``, one CUDA stream each) against each part decoded alone
    (``decode_parts=1``, a batch of the part's rows): the same rows in the same kernels, so the same
    tokens are expected whatever the overlap. Returns counts of rows compared and rows that differ."""
    reqs = [GenerationRequest("bert", i % 2, seed=104_729 + 31 * i) for i in range(rows)]
    together = SteeredGenerator(lm, lm_tok, {"bert": teacher}, guided_params(m, tokens, rows, decode_parts=2),
                                device=device).generate(reqs)
    half = rows // 2
    alone = SteeredGenerator(lm, lm_tok, {"bert": teacher}, guided_params(m, tokens, half, decode_parts=1),
                             device=device)
    separate = alone.generate(reqs[:half]) + alone.generate(reqs[half:])
    differ = sum(a.token_ids != b.token_ids for a, b in zip(together, separate))
    return {"rows": rows, "tokens": tokens, "rows_that_differ": differ}


def sync_census(lm, lm_tok, teacher, device, *, rows: int, tokens: int, m: int = 50) -> dict:
    """Where a guided run (engine defaults) waits for the GPU: every synchronising CUDA call that
    torch reports under ``torch.cuda.set_sync_debug_mode``, counted by the Python line that made it."""
    if device.type != "cuda":
        return {}
    params = guided_params(m, tokens, rows)
    gen = SteeredGenerator(lm, lm_tok, {"bert": teacher}, params, device=device)
    reqs = [GenerationRequest("bert", i % 2, seed=15_485_863 + i) for i in range(rows)]
    gen.generate(reqs[:2])
    where = host_reads(lambda: gen.generate(reqs))
    return {"rows": rows, "tokens": tokens, "parts": params.decode_parts, "total": sum(where.values()),
            "steps": gen.stats.steps, "teacher_forwards": gen.stats.teacher_forwards, "by_line": where}


def host_reads(run) -> dict[str, int]:
    """Every synchronising CUDA call that ``run()`` makes, as torch reports them under
    ``torch.cuda.set_sync_debug_mode``, counted by the Python line that made it (most first)."""
    import collections
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    where = collections.Counter(f"{Path(w.filename).parent.name}/{Path(w.filename).name}:{w.lineno}"
                                for w in caught if "synchroniz" in str(w.message))
    return dict(where.most_common())


def check_token_map(lm_tok, teacher, device, streams: int = 8, steps: int = 40, n_cand: int = 50) -> tuple[int, int]:
    """Device-assembled teacher ids vs tokenizing the full text, on random LM token streams."""
    import random

    import numpy as np

    from dfkd_ray.generation.token_map import LmVocabulary, TeacherTokenMap

    vocab = LmVocabulary(lm_tok)
    tmap = TeacherTokenMap(vocab, teacher.tokenizer, teacher.max_length, device)
    rng = random.Random(0)
    seqs = [[rng.randrange(1, len(lm_tok)) for _ in range(steps)] for _ in range(streams)]
    rows = tmap.rows([b""] * streams)
    checked = bad = 0
    for t in range(steps):
        cand = np.array([rng.sample(range(1, len(lm_tok)), n_cand) for _ in range(streams)])
        inputs = rows.inputs(cand)
        ids, lengths = inputs.input_ids.cpu().tolist(), inputs.lengths
        for r in range(streams):
            for j in range(n_cand):
                k = r * n_cand + j
                checked += 1
                bad += ids[k][:lengths[k]] != tmap.reference_ids(vocab.text(seqs[r][:t] + [int(cand[r, j])]))
        rows.advance([s[t] for s in seqs])
    return checked, bad


def dense_teacher_rate(teacher, cfg, device, n: int, width: int, reps: int = 5) -> float:
    """Teacher FLOP/s on dense inputs (no padding): the ceiling for this teacher under transformers."""
    x = torch.randint(1000, cfg.vocab_size, (n, width), device=device)
    a = torch.ones_like(x)
    with torch.inference_mode():
        for _ in range(2):
            teacher.forward_ids(x, a, with_blocks=False)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            teacher.forward_ids(x, a, with_blocks=False)
        sync(device)
    dt = (time.perf_counter() - t0) / reps
    return teacher_flops(cfg, n * width, n * width * width, n) / dt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes and sizes for a CPU smoke test")
    ap.add_argument("--tokenizers", default=str(HERE / ".carry" / "generation_bench"))
    ap.add_argument("--tokens", type=int, default=64, help="LM tokens per sample (EOS banned: every row runs this long)")
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--teacher-max-length", type=int, default=128)
    ap.add_argument("--chunk-tokens", type=int, default=262_144)
    ap.add_argument("--batching", choices=("padded", "uniform"), default="padded",
                    help="teacher batching of the guided runs")
    ap.add_argument("--sdpa", choices=("no_cudnn", "any"), default="no_cudnn",
                    help="sdpa of the main guided runs")
    ap.add_argument("--parts", type=int, default=1,
                    help="decode_parts of the main guided runs (default: the engine's, 1)")
    ap.add_argument("--compare", choices=("sdpa", "batching", "parts"), default="sdpa",
                    help="what the comparison runs change: the other sdpa, the other teacher batching, "
                         "or decode_parts (2 against the main runs' 1; 1 against more)")
    ap.add_argument("--plan", choices=("full", "key", "pair", "one", "wide"), default="full",
                    help="key: only the largest guided runs of each m (and the naive reference for m=50); "
                         "pair: m=50/256 rows and m=200/64 rows only; one: m=50/256 rows only; wide: m=50 with "
                         "512 rows against 256 (use with --parts 2 --compare parts)")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    if args.tiny:
        args.tokens = min(args.tokens, 12)
        plan_unguided = [(8, 16)]
        plan_guided = [(10, 4, 8), (50, 8, 8), (200, 4, 4), (50, 8, 8, 2)]  # (m, batch, samples[, parts])
        plan_other = [(50, 8, 8)]
        plan_naive = [(50, 2)]
        peak_n = 512
    else:
        plan_unguided = [(64, 256), (256, 512)]
        plan_guided = [(10, 64, 128), (10, 256, 512), (50, 16, 32), (50, 64, 128), (50, 256, 512),
                       (200, 16, 32), (200, 64, 128)]
        plan_other = [(50, 256, 256), (200, 64, 64)]  # the same with the other sdpa or batching
        plan_naive = [(50, 4), (10, 4)]
        peak_n = 8192
        if args.plan == "key":
            plan_unguided = [(256, 512)]
            plan_guided = [(10, 256, 512), (50, 64, 128), (50, 256, 512), (200, 64, 128)]
            plan_other = [(50, 256, 512), (200, 64, 128)]
            plan_naive = [(50, 4)]
        if args.plan == "pair":  # the two largest guided runs, each with and without the compared setting
            plan_unguided = [(256, 512)]
            plan_guided = [(50, 256, 512), (200, 64, 128)]
            plan_other = [(50, 256, 512), (200, 64, 128)]
            plan_naive = [(50, 4)]
        if args.plan == "one":
            plan_unguided, plan_guided, plan_other, plan_naive = [(256, 512)], [(50, 256, 512)], [(50, 256, 512)], []
        if args.plan == "wide":  # 512 rows as 2 parts of 256 against 1 part of 512 and 1 part of 256
            plan_unguided, plan_guided, plan_naive = [(256, 512)], [(50, 256, 512, 1), (50, 512, 1024)], []
            plan_other = [(50, 512, 1024)]

    lm, lm_tok, teacher, cfg = build(args, device)
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "python": platform.python_version(), "tokens_per_sample": args.tokens,
            "teacher_max_length": args.teacher_max_length, "chunk_tokens": args.chunk_tokens}
    import transformers

    info["transformers"] = transformers.__version__
    peak = matmul_rate(device, peak_n, torch.bfloat16 if device.type == "cuda" else torch.float32)
    info["matmul_tflops"] = peak / 1e12
    dense = dense_teacher_rate(teacher, cfg, device, *((9600, 64) if not args.tiny else (64, 32)))
    info["dense_teacher_frac_of_peak"] = dense / peak
    print(f"device {info['device']}; matmul {peak / 1e12:.0f} TFLOP/s; teacher on dense "
          f"{'9600x64' if not args.tiny else '64x32'}: {dense / peak:.1%} of it", flush=True)
    checked, bad = check_token_map(lm_tok, teacher, device, steps=12 if args.tiny else 40)
    info["token_map_check"] = {"candidates": checked, "mismatches": bad}
    print(f"token map on {device}: {checked} candidates checked against full tokenization, {bad} mismatches", flush=True)
    info["parts_check"] = check_parts(lm, lm_tok, teacher, device, rows=8 if args.tiny else 64, tokens=args.tokens)
    print(f"decode_parts=2 against each part alone: {info['parts_check']}", flush=True)
    info["sync_census"] = sync_census(lm, lm_tok, teacher, device, rows=64, tokens=8)
    print(f"host-device synchronisations of a guided run: {info['sync_census']}", flush=True)
    rows = []
    for batch, samples in plan_unguided:
        rows.append(run_one(lm, lm_tok, teacher, cfg, device, label="unguided", batch=batch, samples=samples, m=args.top_k,
                            lam=0.0, token_map="auto", args=args, peak=peak))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "example"}), flush=True)
    for m, batch, samples, *parts in plan_guided:  # an optional 4th element: this run's decode_parts
        rows.append(run_one(lm, lm_tok, teacher, cfg, device, label="guided", batch=batch, samples=samples, m=m,
                            lam=8.0, token_map="auto", args=args, peak=peak, batching=args.batching, sdpa=args.sdpa,
                            parts=parts[0] if parts else args.parts))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "example"}), flush=True)
    other_sdpa, other_batching, other_parts = args.sdpa, args.batching, args.parts
    if args.compare == "sdpa":
        other_sdpa = "any" if args.sdpa == "no_cudnn" else "no_cudnn"
    elif args.compare == "batching":
        other_batching = "uniform" if args.batching == "padded" else "padded"
    else:
        other_parts = 1 if args.parts > 1 else 2
    for m, batch, samples in plan_other:
        rows.append(run_one(lm, lm_tok, teacher, cfg, device, label="guided", batch=batch, samples=samples, m=m,
                            lam=8.0, token_map="auto", args=args, peak=peak, batching=other_batching,
                            sdpa=other_sdpa, parts=other_parts))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "example"}), flush=True)
    for m, samples in plan_naive:
        rows.append(run_one(lm, lm_tok, teacher, cfg, device, label="naive", batch=1, samples=samples, m=m, lam=8.0,
                            token_map="exact", args=args, peak=peak))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "example"}), flush=True)
    naive = {r["m"]: r["samples_per_s"] for r in rows if r["run"] == "naive"}
    for r in rows:
        if r["run"] == "guided" and r["m"] in naive:
            r["speedup_vs_naive"] = r["samples_per_s"] / naive[r["m"]]
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"info": info, "runs": rows}, indent=2))
    print()
    print("| run | m | batch | samples | parts | sdpa | batching | samples/s | LM tok/s | teacher % of matmul peak "
          "(wall) | (in forward) | padding | token map s | x naive |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        def pct(key):
            return f"{100 * r[key]:.1f}%" if key in r else "-"
        speed = f"{r['speedup_vs_naive']:.1f}x" if "speedup_vs_naive" in r else "-"
        print(f"| {r['run']} | {r['m'] or '-'} | {r['batch']} | {r['samples']} | {r['parts']} | {r['sdpa'] or '-'} | "
              f"{r['batching'] or '-'} | "
              f"{r['samples_per_s']:.2f} | "
              f"{r['tokens_per_s']:.0f} | {pct('teacher_frac_of_peak_wall')} | {pct('teacher_frac_of_peak_in_forward')} | "
              f"{pct('padding_overhead')} | {r['token_map_seconds']:.2f} | {speed} |")
    print(f"\n{info}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
