"""Serving benchmark: replay a request trace through the Read-ME engine under every batching
policy x expert-cache policy x capacity C (2 .. E-1), on the real engine (CPU wall clock) and
on simulated accelerators (A100 / H200 cost model), with prefetch and on-demand loading.

By default the real engine runs every batching policy (all experts resident) and every cache
policy x C under expert-aware batching (plus Belady with prefetch); the simulated accelerators
run the whole grid. `--real_grid full` runs the whole grid on the real engine too (about 3x
longer). Compilation takes ~2 minutes (once per capacity); `--compile_cache DIR` keeps it.

  # SmolLM2 Read-ME (refactored on the fly unless --checkpoint): ~6-9 min on 2 busy CPU cores
  python launch/serve_bench.py --out_dir runs/serve_bench
  # a trained checkpoint, a bigger bursty trace
  python launch/serve_bench.py --checkpoint runs/smollm2_135m/moe_init --num_requests 32 --cv 3
  # your own trace (JSONL: id, arrival_s, prompt | prompt_tokens, max_new_tokens)
  python launch/serve_bench.py --trace trace.jsonl
  # seconds: a random tiny model and random prompts (smoke test)
  python launch/serve_bench.py --model tiny --out_dir /tmp/serve_bench_tiny

Writes results.json, report.md (+ PNG plots), trace.jsonl and logs/ (per run: the cache
decision log, checkable with readme_jax.serve.cache.replay_check, and the per-step JSONL).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in s.split(",") if x.strip())


def _strs(s: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in s.split(",") if x.strip())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        choices=["smollm2", "tiny"],
        default="smollm2",
        help="smollm2: a Read-ME checkpoint (--checkpoint) or SmolLM2 refactored on "
        "the fly; tiny: a random 2-layer model with random prompts",
    )
    g.add_argument("--checkpoint", default="", help="Read-ME checkpoint dir (holds model.json)")
    g.add_argument(
        "--domains",
        default="fiction,drama,code_docs,manual",
        help="experts (when refactoring on the fly) and prompt sources",
    )
    g.add_argument("--calib_sequences", type=int, default=4, help="per domain, on-the-fly only")
    g.add_argument("--calib_len", type=int, default=256, help="tokens per calibration sequence")
    g = p.add_argument_group("trace")
    g.add_argument("--trace", default="", help="JSONL trace to replay instead of generating one")
    g.add_argument("--num_requests", type=int, default=8)
    g.add_argument(
        "--rate", type=float, default=1.0, help="arrivals per second of CPU time (0: all at once)"
    )
    g.add_argument(
        "--cv",
        type=float,
        default=1.0,
        help="coefficient of variation of gaps: 1 Poisson, > 1 bursty (gamma)",
    )
    g.add_argument(
        "--prompt_len",
        type=_ints,
        default=(16, 32),
        help="lo,hi prompt tokens (uniform), cut from held-out documents",
    )
    g.add_argument(
        "--output_len",
        type=_ints,
        default=(10, 20),
        help="median,max new tokens (lognormal, sigma 0.6, at least 4)",
    )
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("engine")
    g.add_argument("--batching", type=_strs, default=("expert", "decode", "prefill"))
    g.add_argument("--policies", type=_strs, default=("belady", "lru", "lfu", "random"))
    g.add_argument("--capacities", type=_ints, default=(), help="C values (default 2..E-1)")
    g.add_argument(
        "--real_grid",
        choices=["full", "cache"],
        default="cache",
        help="full: every batching x policy x C on the real engine; cache: the "
        "policy x C grid with expert batching only (others simulated)",
    )
    g.add_argument(
        "--no_real_prefetch", action="store_true", help="skip the real Belady + prefetch runs"
    )
    g.add_argument("--num_slots", type=int, default=8, help="request slots N")
    g.add_argument("--max_batch_tokens", type=int, default=32)
    g.add_argument("--prefill_chunk", type=int, default=32)
    g.add_argument("--max_len", type=int, default=128, help="context per request slot")
    g.add_argument("--max_wait", type=int, default=32, help="fairness bound (steps)")
    g = p.add_argument_group("simulation and output")
    g.add_argument("--profiles", type=_strs, default=("a100", "h200"))
    g.add_argument(
        "--scales",
        type=_strs,
        default=("served", "llama2-7b"),
        help="served: the model's own sizes; llama2-7b: the paper's scale",
    )
    g.add_argument("--sim_logs", action="store_true", help="dump simulated runs' logs too")
    g.add_argument("--out_dir", default="runs/serve_bench")
    g.add_argument(
        "--compile_cache",
        default="",
        help="persistent XLA compilation cache dir (speeds up reruns)",
    )
    return p.parse_args(argv)


def heldout_prompts(tokenizer, domains, min_len: int, per_domain: int = 64, seed: int = 0):
    """Documents (token arrays, EOS dropped) of each domain's validation split, balanced."""
    from readme_jax.data import load_offsets, load_tokens

    rng = np.random.default_rng(seed)
    out = []
    for d in domains:
        toks, offs = (
            load_tokens(d, "validation", tokenizer),
            load_offsets(d, "validation", tokenizer),
        )
        docs = [np.asarray(toks[a : b - 1]) for a, b in zip(offs[:-1], offs[1:], strict=True)]
        docs = [x for x in docs if len(x) >= min_len]
        if not docs:
            raise SystemExit(f"error: domain {d!r} has no held-out document of {min_len} tokens")
        out += [docs[i] for i in rng.permutation(len(docs))[:per_domain]]
    return out


def build_trace(args, sm):
    from readme_jax.serve import trace as tr

    if args.trace:
        reqs = tr.load_trace(args.trace)
        return reqs, {"description": f"{len(reqs)} requests from {args.trace}", "file": args.trace}
    lo, hi = args.prompt_len
    med, mx = args.output_len
    if sm.tokenizer is None:  # tiny model: random token prompts
        rng = np.random.default_rng(args.seed)
        V = sm.params.rc.model.vocab_size
        prompts = [rng.integers(3, V, hi) for _ in range(16)]
    else:
        prompts = heldout_prompts(sm.tokenizer, _strs(args.domains), hi, seed=args.seed)
    out_len = tr.LengthDist("lognormal", median=med, sigma=0.6, lo=min(4, mx), hi=mx)
    rate = args.rate if args.rate > 0 else 1e9
    plen = tr.LengthDist("uniform", lo=lo, hi=hi)
    reqs = tr.make_trace(
        prompts,
        args.num_requests,
        rate,
        cv=args.cv,
        output_len=out_len,
        prompt_len=plen,
        seed=args.seed,
    )
    kind = "Poisson" if args.cv == 1 else f"gamma (cv {args.cv})"
    desc = (
        f"{len(reqs)} requests, {kind} arrivals at {args.rate}/s, prompts of {lo}-{hi} tokens "
        f"from held-out {args.domains if sm.tokenizer else 'random tokens'}, output "
        f"{out_len.describe()}"
    )
    return reqs, {"description": desc, "seed": args.seed}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import jax

    if args.compile_cache:
        jax.config.update("jax_compilation_cache_dir", args.compile_cache)
    from readme_jax.serve import bench
    from readme_jax.serve import trace as tr
    from readme_jax.serve.engine import EngineConfig
    from readme_jax.serve.moe_generate import load_serve_model, tiny_serve_model

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if args.model == "tiny":
        sm = tiny_serve_model(seed=args.seed)
    else:
        sm = load_serve_model(
            args.checkpoint or None,
            domains=args.domains,
            calib_sequences=args.calib_sequences,
            calib_len=args.calib_len,
        )
    print(f"[model] {sm.source} ({time.perf_counter() - t0:.0f}s)")
    trace, info = build_trace(args, sm)
    tr.save_trace(out / "trace.jsonl", trace)
    reqs = bench.requests_from_trace(trace, sm.tokenizer)
    print(f"[trace] {info['description']}")
    bc = bench.BenchConfig(
        engine=EngineConfig(
            num_slots=args.num_slots,
            max_len=args.max_len,
            prefill_chunk=args.prefill_chunk,
            max_batch_tokens=args.max_batch_tokens,
            max_wait=args.max_wait,
        ),
        batching=args.batching,
        policies=args.policies,
        capacities=args.capacities or None,
        real_grid=args.real_grid,
        real_prefetch=not args.no_real_prefetch,
        profiles=args.profiles,
        scales=args.scales,
        sim_logs=args.sim_logs,
    )
    real = bench.run_real(sm, reqs, bc, out)
    fit = bench.cpu_calibration(sm, real)
    sim = bench.run_sim(sm, reqs, real, bc, out)
    command = "python launch/serve_bench.py " + " ".join(sys.argv[1:] if argv is None else argv)
    results = bench.build_results(sm, bc, info, real, sim, fit, command)
    paths = bench.write_outputs(results, out)
    print(f"[done] {time.perf_counter() - t0:.0f}s: {paths['report']}, {paths['results']}")
    return results


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
