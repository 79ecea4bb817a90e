"""Teacher-steered decoding (StrataNet Eq. 1): the vLLM engine against the Hugging Face engine.

Both engines write the same requests (each teacher x each class x ``--per-class`` seeds) with the
same decoding parameters; for each control strength and engine this reports the class-hit rate
(share of texts the request's teacher classifies as the target: what the teacher believes, not
evidence of quality), the mean recorded teacher confidence, samples/s and LM tokens/s over wall
time (after a warm-up that loads teachers and builds token maps), and vLLM's speed-up.

The vLLM engine is built first, before any teacher of this process touches the GPU (vLLM sizes its
KV cache from the free memory it finds); the Hugging Face engine then reuses this process's teachers.

GPU node with the extra installed (``pip install -e '.[vllm]'``), from the repository root:
    python benchmarks/vllm_engine.py --lm /models/gpt2 --teacher agnews=/models/bert-agnews \\
        --teacher yelp=/models/roberta-yelp --per-class 32 --out vllm_engine.json
``--shapes gpt2-small`` runs the same comparison at the shapes of ``benchmarks/generation.py``: a
GPT-2-small-shaped LM (12 x 768) and BERT-base-shaped teachers (12 x 768) with random weights, built
under ``--work`` with the tokenizers and label sets of ``--lm`` and ``--teacher`` (speed does not depend
on the weights; the hit rate is then a random teacher's belief: it compares the engines' steering, not
the text).
``--help`` works without vLLM; ``--device cpu --engines hf`` is a CPU smoke run of the HF half.
Imports torch, transformers, vLLM (when run) and dfkd_ray's config, models and generation modules only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from dfkd_ray.config import SteeredConfig, TeacherConfig
from dfkd_ray.generation.hf import SteeredGenerator
from dfkd_ray.generation.steering import GenerationRequest


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Example: python benchmarks/vllm_engine.py --lm LM_DIR --teacher a=DIR_A --out r.json")
    ap.add_argument("--lm", required=True, help="local causal-LM directory (decoder-only)")
    ap.add_argument("--teacher", action="append", required=True, metavar="NAME=DIR",
                    help="a teacher classifier directory (repeat for several)")
    ap.add_argument("--per-class", type=int, default=32, help="requests per (teacher, class)")
    ap.add_argument("--strengths", default="0,8", help="comma-separated lambdas; 0 is the unguided reference")
    ap.add_argument("--top-m", type=int, default=50)
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--min-new-tokens", type=int, default=8)
    ap.add_argument("--prompt", default="", help="template; '{label}' becomes the class name")
    ap.add_argument("--batch-size", type=int, default=128, help="HF: rows decoded together; vLLM: max_num_seqs")
    ap.add_argument("--max-length", type=int, default=128, help="teacher truncation length")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.5,
                    help="vLLM's share of GPU memory; leave room for the teachers and the HF engine")
    ap.add_argument("--engines", default="vllm,hf", help="which engines to run, in this order (vllm first)")
    ap.add_argument("--shapes", choices=("given", "gpt2-small"), default="given",
                    help="given: the models as they are; gpt2-small: random GPT-2-small / BERT-base models "
                         "with their tokenizers and labels (built under --work)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/vllm-engine-bench"), help="where --shapes builds models")
    ap.add_argument("--profile", action="store_true",
                    help="vLLM's engine in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) and a host profile "
                         "(cProfile) of each vLLM run: where the host's time goes, the steering processor's "
                         "share; the samples/s of such a run are not the engine's default")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of the HF half only (--engines hf)")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return ap.parse_args(argv)


def random_shapes(lm: str, teachers: dict[str, str], work: Path, seed: int = 0) -> tuple[str, dict[str, str]]:
    """A GPT-2-small-shaped LM and BERT-base-shaped teachers with random weights, saved under ``work``
    with the tokenizers (and the teachers' label sets) of the given directories; their paths."""
    from transformers import (AutoConfig, AutoTokenizer, BertConfig, BertForSequenceClassification, GPT2Config,
                              GPT2LMHeadModel)

    torch.manual_seed(seed)
    lm_tok = AutoTokenizer.from_pretrained(lm)
    out_lm = work / "lm"
    lm_cfg = GPT2Config(vocab_size=len(lm_tok), n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                        bos_token_id=lm_tok.bos_token_id, eos_token_id=lm_tok.eos_token_id)
    GPT2LMHeadModel(lm_cfg).save_pretrained(out_lm)
    lm_tok.save_pretrained(out_lm)
    out_teachers = {}
    for name, path in teachers.items():
        tok, cfg = AutoTokenizer.from_pretrained(path), AutoConfig.from_pretrained(path)
        out = out_teachers[name] = work / "teachers" / name
        BertForSequenceClassification(BertConfig(vocab_size=len(tok), hidden_size=768, num_hidden_layers=12,
                                                 num_attention_heads=12, intermediate_size=3072,
                                                 max_position_embeddings=512, id2label=cfg.id2label,
                                                 label2id=cfg.label2id)).save_pretrained(out)
        tok.save_pretrained(out)
    return str(out_lm), {n: str(p) for n, p in out_teachers.items()}


def requests_for(teachers: dict, per_class: int, seed: int) -> list[GenerationRequest]:
    """Each seed once per class of a teacher: unguided texts do not depend on the target."""
    return [GenerationRequest(name, c, seed=seed + 1000 * i) for name, t in teachers.items()
            for c in range(len(t.labels)) for i in range(per_class)]


PROFILED = ("apply", "steer_step", "forward_ids", "update_state", "generate")
"""Functions whose cumulative time a profiled run reports by name (the steering processor's calls,
the teachers' forwards, vLLM's batch updates, the whole ``generate``)."""


def host_profile(prof, rows: int = 30) -> dict:
    """The profile's top functions by cumulative time (text) and the cumulative seconds of :data:`PROFILED`."""
    import io
    import pstats

    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text).sort_stats("cumulative")
    stats.print_stats(rows)
    named = {}
    for (file, _, func), (_, _, _, cumulative, _) in stats.stats.items():
        if func in PROFILED and ("dfkd_ray" in file or "vllm" in file):
            key = f"{Path(file).name}:{func}"
            named[key] = round(named.get(key, 0.0) + cumulative, 3)
    return {"cumulative_s": dict(sorted(named.items(), key=lambda kv: -kv[1])), "top": text.getvalue()}


def measure(gen, reqs: list[GenerationRequest], device: torch.device, profile: bool = False) -> dict:
    import cProfile

    gen.generate(reqs[:: max(1, len(reqs) // 16)])  # warm-up: teachers loaded, token maps built, kernels compiled
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    prof = cProfile.Profile() if profile else None
    t0 = time.perf_counter()
    if prof is not None:
        prof.enable()
    results = gen.generate(reqs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if prof is not None:
        prof.disable()
    seconds = time.perf_counter() - t0
    hits = [r.teacher_prediction == q.target for r, q in zip(results, reqs)]
    tokens = sum(r.num_tokens for r in results)
    return {"samples": len(reqs), "seconds": seconds, "samples_per_s": len(reqs) / seconds,
            "lm_tokens_per_s": tokens / seconds, "mean_tokens": tokens / len(reqs),
            "class_hit_rate": sum(hits) / len(hits),
            "mean_teacher_confidence": sum(r.teacher_confidence for r in results) / len(results),
            "eos_share": sum(r.stop_reason == "eos" for r in results) / len(results),
            **({"host_profile": host_profile(prof)} if prof is not None else {})}


def main(argv=None) -> dict:
    args = parse_args(argv)
    paths = {}
    for item in args.teacher:
        name, _, path = item.partition("=")
        if not name or not path:
            raise SystemExit(f"--teacher wants NAME=DIR, got {item!r}")
        paths[name] = path
    lm = str(args.lm)
    if args.shapes == "gpt2-small":
        lm, paths = random_shapes(lm, paths, args.work, args.seed)
    specs = {name: {"path": path, "max_length": args.max_length, "dtype": "auto", "trust_remote_code": False}
             for name, path in paths.items()}
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible: this benchmark compares GPU engines (--device cpu --engines hf: smoke run)")
    strengths = [float(s) for s in args.strengths.split(",")]
    base = dict(top_m=args.top_m, top_k=args.top_k, top_p=args.top_p, temperature=args.temperature,
                max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens, prompt=args.prompt,
                batch_size=args.batch_size)
    report = {"lm": lm, "shapes": args.shapes, "teachers": specs, "params": base, "per_class": args.per_class,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "python": platform.python_version(), "runs": []}
    config = SteeredConfig(lm_path=lm, **base)
    teacher_configs = [TeacherConfig(name=n, **s) for n, s in specs.items()]
    teachers = None
    gens = {}
    if "vllm" in engines:
        if args.profile:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine loop in this process, seen by cProfile
        import vllm

        from dfkd_ray.generation.vllm import VllmSteeredGenerator

        report["vllm"] = vllm.__version__
        # One engine for every lambda: lambda travels with each request (SamplingParams.extra_args).
        gens["vllm"] = VllmSteeredGenerator(config, teacher_configs, device=str(device),
                                            engine_kwargs={"gpu_memory_utilization": args.gpu_memory_utilization,
                                                           "seed": args.seed})
        teachers = gens["vllm"].teachers
    if teachers is None:
        from dfkd_ray.models.teacher import load_teachers

        teachers = load_teachers(teacher_configs, device=device)
    if "hf" in engines:
        gens["hf"] = SteeredGenerator.from_pretrained(config, teachers, device=device)
    reqs = requests_for(teachers, args.per_class, args.seed)
    for lam in strengths:
        lam_reqs = [GenerationRequest(q.teacher, q.target, q.seed, control_strength=lam) for q in reqs]
        for engine in engines:
            row = {"engine": engine, "control_strength": lam,
                   **measure(gens[engine], lam_reqs, device, profile=args.profile and engine == "vllm")}
            report["runs"].append(row)
            prof = row.get("host_profile")
            print(json.dumps({k: v for k, v in row.items() if k != "host_profile"}), flush=True)
            if prof:
                print(prof["top"], "\n", json.dumps(prof["cumulative_s"]), flush=True)

    print(f"\n{'engine':<6} {'lambda':>6} {'hit rate':>9} {'conf':>6} {'samples/s':>10} {'tokens/s':>10} {'tokens':>7}")
    for r in report["runs"]:
        print(f"{r['engine']:<6} {r['control_strength']:>6g} {r['class_hit_rate']:>9.3f} {r['mean_teacher_confidence']:>6.3f} "
              f"{r['samples_per_s']:>10.1f} {r['lm_tokens_per_s']:>10.0f} {r['mean_tokens']:>7.1f}")
    ratios = {}
    for lam in strengths:
        by = {r["engine"]: r for r in report["runs"] if r["control_strength"] == lam}
        if "vllm" in by and "hf" in by:
            ratios[str(lam)] = by["vllm"]["samples_per_s"] / by["hf"]["samples_per_s"]
            print(f"lambda {lam:g}: vLLM / HF samples/s = {ratios[str(lam)]:.2f}")
    report["vllm_over_hf_samples_per_s"] = ratios
    print("class-hit rate and confidence are the teachers' beliefs about the texts, not a measure of their quality")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
