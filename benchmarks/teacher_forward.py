"""Where the teacher's time goes in guided decoding: replay the exact teacher inputs of a guided run.

A guided run (StrataNet Eq. 1; GPT-2-small-shaped LM, BERT-base-shaped teacher, random weights, as
``benchmarks/generation.py``) is run once with the teacher's ``forward_ids`` recording every chunk it
is given. The recorded chunks are then replayed through several ways of running the same teacher,
each timed with CUDA events over the whole list (median of ``--reps`` passes), and reported as the
teacher's useful FLOPs (real tokens only) per second as a fraction of the bf16 matmul rate measured in
the same run. A ``torch.profiler`` table of the current path shows which kernels take the time.

GPU (tokenizers as for benchmarks/generation.py, ``--tokenizers``):
      python benchmarks/teacher_forward.py --profile --out results/teacher_forward.json
      python benchmarks/teacher_forward.py --loop plain,again,profiled --variants sdpa --out results/loop.json
      python benchmarks/teacher_forward.py --loop plain,stages --variants "" --parts 1 --out results/stages.json
CPU smoke test:  python benchmarks/teacher_forward.py --tiny --device cpu
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from dfkd_ray.config import SteeredConfig
from dfkd_ray.generation.hf import SteeredGenerator
from dfkd_ray.generation.steering import GenerationRequest
from dfkd_ray.generation.streams import covered
from generation import HERE, build, guided_params, matmul_rate, sync, teacher_flops  # benchmarks/generation.py, beside this file


def guided_run(args) -> tuple[SteeredConfig, list[GenerationRequest]]:
    """The guided run every measurement here repeats: parameters and requests (one batch)."""
    params = guided_params(args.m, args.tokens, args.batch, strength=args.strength,
                           teacher_chunk_tokens=args.chunk_tokens, decode_parts=args.parts)
    return params, [GenerationRequest("bert", i % 2, seed=7919 * i + 1) for i in range(args.batch)]


def capture(lm, lm_tok, teacher, device, args) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """The teacher chunks of one guided run, as given to ``forward_ids``."""
    chunks = []
    original = teacher.forward_ids

    def recording(input_ids, attention_mask, **kw):
        chunks.append((input_ids.clone(), None if attention_mask is None else attention_mask.clone()))
        return original(input_ids, attention_mask, **kw)

    params, reqs = guided_run(args)
    gen = SteeredGenerator(lm, lm_tok, {"bert": teacher}, params, device=device)
    teacher.forward_ids = recording
    try:
        gen.generate(reqs)
    finally:
        del teacher.forward_ids
    return chunks


def loop_runs(lm, lm_tok, teacher, cfg, device, args, peak) -> list[dict]:
    """The same guided run timed inside the generation loop, in order: ``plain`` (first time these
    teacher input shapes are seen), ``again`` (the same requests again: shapes seen before),
    ``compiled`` (``torch.compile(dynamic=True)`` teacher) and ``profiled`` (GPU kernel table);
    allocator counters for each."""
    params, reqs = guided_run(args)
    rows = []
    for name in args.loop.split(","):
        gen = SteeredGenerator(lm, lm_tok, {"bert": teacher}, params, device=device)
        model = teacher.model
        if name == "compiled":
            teacher.model = torch.compile(model, dynamic=True)
        gen.generate(reqs[:4])
        stats0 = torch.cuda.memory_stats(device) if device.type == "cuda" else {}
        sync(device)
        t0 = time.perf_counter()
        if name == "profiled":
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with profile(activities=acts) as prof:
                gen.generate(reqs)
                sync(device)
        elif name == "stages":
            stages = stage_profile(gen, teacher, reqs, device)
        else:
            gen.generate(reqs)
            sync(device)
        wall = time.perf_counter() - t0
        teacher.model = model
        st = gen.stats
        useful = teacher_flops(cfg, st.teacher_tokens, st.teacher_tokens_sq, st.teacher_sequences)
        row = {"loop": name, "wall_s": wall, "teacher_s": st.teacher_seconds, "forwards": st.teacher_forwards,
               "frac_wall": useful / wall / peak, "frac_in_forward": useful / max(st.teacher_seconds, 1e-9) / peak,
               "token_map_s": st.tokenizer_seconds}
        if device.type == "cuda":
            stats1 = torch.cuda.memory_stats(device)
            for k in ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams"):
                row[k] = stats1.get(k, 0) - stats0.get(k, 0)
        if name == "stages":
            row["stages"] = stages
        if name == "profiled":
            events = prof.key_averages()
            kernel_us = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA")
            row["gpu_kernel_s"] = kernel_us / 1e6
            key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
            print(events.table(sort_by=key, row_limit=30, max_name_column_width=70), flush=True)
            print(events.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=70), flush=True)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def merged(spans) -> list[tuple[float, float]]:
    """Sorted, non-overlapping union of ``(start, end)`` spans."""
    out: list[list[float]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def overlap(xs, ys) -> float:
    """Total length where two merged span lists intersect."""
    i = j = 0
    total = 0.0
    while i < len(xs) and j < len(ys):
        lo, hi = max(xs[i][0], ys[j][0]), min(xs[i][1], ys[j][1])
        total += max(0.0, hi - lo)
        if xs[i][1] < ys[j][1]:
            i += 1
        else:
            j += 1
    return total


# The engine's stages, labelled for the profiler by wrapping (the engine itself carries no profiling code).
STAGES = {"lm_forward": ("gen", "_lm_forward"), "top_m": ("steering", "select_top_m"),
          "teacher_inputs": ("TeacherRows", "inputs"), "teacher_forward": ("teacher", "forward_ids"),
          "sample": ("hf", "sample_candidates"), "sample_unguided": ("hf", "sample_top_k"),
          "advance_rows": ("TeacherRows", "advance")}


def stage_profile(gen, teacher, reqs, device) -> dict:
    """One guided run under ``torch.profiler`` with the engine's stages labelled: each stage's host
    time and the GPU time of the kernels it launched, the GPU's busy time (union of kernels) against
    the wall, and which stage the host was in while the GPU had nothing to do."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from dfkd_ray.generation import hf, steering
    from dfkd_ray.generation.token_map import TeacherRows

    owners = {"gen": gen, "hf": hf, "steering": steering, "TeacherRows": TeacherRows, "teacher": teacher}
    missing = object()
    saved = []

    def labelled(fn, name):
        def run(*a, **k):
            with record_function("stage:" + name):
                return fn(*a, **k)
        return run

    for name, (owner, attr) in STAGES.items():
        obj = owners[owner]
        saved.append((obj, attr, vars(obj).get(attr, missing)))  # what the object itself held, if anything
        fn = vars(obj)[attr] if isinstance(obj, type) else getattr(obj, attr)  # a class: its plain function
        setattr(obj, attr, labelled(fn, name))
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    try:
        sync(device)
        t0 = time.perf_counter()
        with profile(activities=acts) as prof:
            gen.generate(reqs)
            sync(device)
        wall = time.perf_counter() - t0
    finally:
        for obj, attr, original in saved:
            if original is missing:
                delattr(obj, attr)
            else:
                setattr(obj, attr, original)
    events = prof.events()
    kernels = merged((e.time_range.start, e.time_range.end) for e in events if e.device_type.name == "CUDA")
    window = (min(e.time_range.start for e in events), max(e.time_range.end for e in events))
    edges = [window[0], *(t for span in kernels for t in span), window[1]]  # window start, kernel spans, end
    gaps = [(a, b) for a, b in zip(edges[::2], edges[1::2]) if b > a]  # before, between and after the kernels
    out = {"wall_s": wall, "profiled_s": (window[1] - window[0]) / 1e6, "gpu_busy_s": covered(kernels) / 1e6,
           "gpu_idle_s": covered(gaps) / 1e6, "stages": {}}
    covered_gaps = 0.0
    for name in STAGES:
        evs = [e for e in events if e.name == "stage:" + name]
        spans = merged((e.time_range.start, e.time_range.end) for e in evs)
        idle = overlap(spans, gaps)
        covered_gaps += idle
        out["stages"][name] = {"calls": len(evs), "host_s": covered(spans) / 1e6,
                               "gpu_kernel_s": sum(e.device_time_total for e in evs) / 1e6,
                               "gpu_idle_during_s": idle / 1e6}
    syncs = [(e.time_range.start, e.time_range.end) for e in events
             if e.name in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")]
    out["host_in_sync_s"] = covered(syncs) / 1e6
    out["gpu_idle_in_no_stage_s"] = (out["gpu_idle_s"] * 1e6 - covered_gaps) / 1e6
    print(f"wall {wall:.2f} s (profiled window {out['profiled_s']:.2f} s): GPU busy {out['gpu_busy_s']:.2f} s, "
          f"idle {out['gpu_idle_s']:.2f} s; host waiting in syncs {out['host_in_sync_s']:.2f} s", flush=True)
    print("| stage | calls | host s | GPU kernel s | GPU idle during s |\n|---|---|---|---|---|")
    for name, st in out["stages"].items():
        print(f"| {name} | {st['calls']} | {st['host_s']:.2f} | {st['gpu_kernel_s']:.2f} | {st['gpu_idle_during_s']:.2f} |")
    print(f"| (no stage) | | | | {out['gpu_idle_in_no_stage_s']:.2f} |", flush=True)
    return out


def chunk_flops(cfg, x: torch.Tensor, a: torch.Tensor | None) -> float:
    n, width = x.shape
    lengths = a.sum(1).double() if a is not None else torch.full((n,), float(width), dtype=torch.float64)
    return teacher_flops(cfg, float(lengths.sum()), float((lengths ** 2).sum()), n)


def round_width(x, a, multiple: int, pad_id: int):
    n, width = x.shape
    target = -(-width // multiple) * multiple
    if target == width:
        return x, a
    if a is None:
        a = torch.ones_like(x)
    x = torch.cat([x, x.new_full((n, target - width), pad_id)], 1)
    a = torch.cat([a, a.new_zeros((n, target - width))], 1)
    return x, a


def time_pass(fn, chunks, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    for x, a in chunks:
        fn(x, a)
    sync(device)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--tokenizers", default=str(HERE / ".carry" / "generation_bench"))
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--m", type=int, default=50)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--strength", type=float, default=8.0, help="lambda; 0 times the LM alone (loop runs)")
    ap.add_argument("--parts", type=int, default=1, help="decode_parts (the engine's default: 1)")
    ap.add_argument("--teacher-max-length", type=int, default=128)
    ap.add_argument("--chunk-tokens", type=int, default=262_144)
    ap.add_argument("--every", type=int, default=3, help="replay every n-th recorded chunk")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--variants", default="sdpa,sdpa_nomask,eager,sdpa_pad16,sdpa_pad64,compiled")
    ap.add_argument("--loop", default="", help="comma list of in-loop runs: plain,again,compiled,profiled,stages "
                                               "(stages: host and GPU time per engine stage, GPU idle by stage)")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler kernel table of the current path")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    if args.tiny:
        args.tokens, args.m, args.batch = 8, 10, 4
    device = torch.device(args.device)
    lm, lm_tok, teacher, cfg = build(args, device)
    peak = matmul_rate(device, 512 if args.tiny else 8192, torch.bfloat16 if device.type == "cuda" else torch.float32)
    loop_rows = loop_runs(lm, lm_tok, teacher, cfg, device, args, peak) if args.loop else []
    if not args.variants:  # in-loop runs only
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"matmul_tflops": peak / 1e12, "loop": loop_rows}, indent=2))
        return 0
    t0 = time.perf_counter()
    chunks = capture(lm, lm_tok, teacher, device, args)
    print(f"captured {len(chunks)} teacher chunks in {time.perf_counter() - t0:.1f} s; "
          f"matmul {peak / 1e12:.0f} TFLOP/s", flush=True)
    chunks = chunks[::args.every]
    widths = [x.shape[1] for x, _ in chunks]
    masked = sum(a is not None for _, a in chunks)
    print(f"replaying {len(chunks)}: widths {min(widths)}..{max(widths)}, {masked} with a mask, "
          f"{sum(x.numel() for x, _ in chunks) / len(chunks):.0f} padded tokens each", flush=True)
    model = teacher.model
    pad_id = teacher.tokenizer.pad_token_id

    def hf(x, a):
        return model(input_ids=x, attention_mask=a).logits

    variants = {
        "sdpa": hf,
        "sdpa_nomask": lambda x, a: hf(x, None),  # wrong for padded rows: the ceiling without a mask
        "sdpa_pad16": lambda x, a: hf(*round_width(x, a, 16, pad_id)),
        "sdpa_pad64": lambda x, a: hf(*round_width(x, a, 64, pad_id)),
    }
    rows = []
    flops = sum(chunk_flops(cfg, x, a) for x, a in chunks)
    with torch.inference_mode():
        for name in args.variants.split(","):
            fn = variants.get(name)
            setup = 0.0
            if name == "eager":
                model.set_attn_implementation("eager")
                fn = hf
            elif name == "compiled":
                model.set_attn_implementation("sdpa")
                compiled = torch.compile(model, dynamic=True)
                t0 = time.perf_counter()
                for x, a in chunks[:8]:
                    compiled(input_ids=x, attention_mask=a)
                sync(device)
                setup = time.perf_counter() - t0

                def fn(x, a, compiled=compiled):
                    return compiled(input_ids=x, attention_mask=a).logits
            if fn is None:
                print(f"unknown variant {name}", flush=True)
                continue
            fn(*chunks[0])  # warm-up
            passes = [time_pass(fn, chunks, device) for _ in range(args.reps)]
            wall = statistics.median(passes)
            if name == "eager":
                model.set_attn_implementation("sdpa")
            rows.append({"variant": name, "seconds": wall, "spread": (max(passes) - min(passes)) / wall,
                         "frac_of_peak": flops / wall / peak, "ms_per_chunk": 1e3 * wall / len(chunks),
                         "setup_s": setup})
            print(json.dumps(rows[-1]), flush=True)
        dense_n = max(1, int(sum(x.numel() for x, _ in chunks) / len(chunks) / 64))
        dense = [(torch.randint(1000, cfg.vocab_size, (dense_n, 64), device=device), None)] * 8
        wall = statistics.median(time_pass(hf, dense, device) for _ in range(args.reps))
        d_flops = 8 * chunk_flops(cfg, *dense[0])
        rows.append({"variant": f"dense {dense_n}x64 no mask", "seconds": wall, "spread": 0.0,
                     "frac_of_peak": d_flops / wall / peak, "ms_per_chunk": 1e3 * wall / 8, "setup_s": 0.0})
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            part = chunks[len(chunks) // 2:len(chunks) // 2 + 10]
            with profile(activities=acts) as prof:
                time_pass(hf, part, device)
            key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
            table = prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=70)
            print(table, flush=True)
            if args.out:
                Path(args.out).with_suffix(".profile.txt").write_text(table)
    for r in loop_rows:
        print(json.dumps(r))
    print("\n| variant | ms per chunk | teacher % of matmul peak | pass spread | setup s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['ms_per_chunk']:.1f} | {100 * r['frac_of_peak']:.1f}% | "
              f"{100 * r['spread']:.1f}% | {r['setup_s']:.0f} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"matmul_tflops": peak / 1e12, "chunks": len(chunks), "rows": rows,
                                              "loop": loop_rows},
                                             indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
