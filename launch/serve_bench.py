"""Serving benchmark: replay a request trace through the Read-ME engine under every batching
policy x expert-cache policy x capacity C (2 .. E-1), on the real engine (CPU wall clock) and
on simulated accelerators (A100 / H200 cost model), with prefetch and on-demand loading.

By default the real engine runs every batching policy (all experts resident) and every cache
policy x C under expert-aware batching (plus Belady with prefetch); the simulated accelerators
run the whole grid. `--config.real_grid=full` runs the whole grid on the real engine too (about
3x longer). Compilation takes ~2 minutes (once per capacity); `--config.compile_cache=DIR` keeps
it.

  # no checkpoint: the newest trained run, else refactored on the fly; ~6-9 min on 2 busy cores
  python launch/serve_bench.py --config.out_dir=runs/serve_bench
  # a trained checkpoint, a bigger bursty trace
  python launch/serve_bench.py --config.checkpoint=runs/smollm2_135m/moe_trained \
      --config.num_requests=32 --config.cv=3
  # your own trace (JSONL: id, arrival_s, prompt | prompt_tokens, max_new_tokens)
  python launch/serve_bench.py --config.trace=trace.jsonl
  # seconds: a random tiny model and random prompts (smoke test)
  python launch/serve_bench.py --config.model=tiny --config.out_dir=runs/serve_bench_tiny

Settings and their defaults: configs/serve_bench.py and its engine block configs/engine.py
(`--config.engine.num_slots=4`; `--config=FILE` for another file). The old flag names of
top-level settings still work (`--model tiny`, `--out_dir DIR`, `--sim_logs`,
`--no_real_prefetch`). With no checkpoint the model is `readme_jax.served.load_served`'s default.

Writes results.json, report.md (+ PNG plots), trace.jsonl and logs/ (per run: the cache
decision log, checkable with readme_jax.serve.bench.replay.replay_check, and the per-step JSONL).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import jax
import numpy as np

from readme_jax import cli
from readme_jax.serve.bench import report, run
from readme_jax.serve.bench import trace as tr
from readme_jax.serve.config import EngineConfig
from readme_jax.served import load_served, on_the_fly_recipe
from readme_jax.testing import tiny_serve_model

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "serve_bench.py"


def build_trace(c, sm):
    if c.trace:
        reqs = tr.load_trace(c.trace)
        return reqs, {"description": f"{len(reqs)} requests from {c.trace}", "file": c.trace}
    lo, hi = cli.ints(c.prompt_len)
    med, mx = cli.ints(c.output_len)
    if sm.tokenizer is None:  # tiny model: random token prompts
        rng = np.random.default_rng(c.seed)
        V = sm.params.rc.model.vocab_size
        prompts = [rng.integers(3, V, hi) for _ in range(16)]
    else:
        prompts = tr.heldout_prompts(sm.tokenizer, cli.csv(c.domains), hi, seed=c.seed)
    out_len = tr.LengthDist("lognormal", median=med, sigma=0.6, lo=min(4, mx), hi=mx)
    rate = c.rate if c.rate > 0 else 1e9
    plen = tr.LengthDist("uniform", lo=lo, hi=hi)
    reqs = tr.make_trace(
        prompts, c.num_requests, rate, cv=c.cv, output_len=out_len, prompt_len=plen, seed=c.seed
    )
    kind = "Poisson" if c.cv == 1 else f"gamma (cv {c.cv})"
    desc = (
        f"{len(reqs)} requests, {kind} arrivals at {c.rate}/s, prompts of {lo}-{hi} tokens "
        f"from held-out {c.domains if sm.tokenizer else 'random tokens'}, output "
        f"{out_len.describe()}"
    )
    return reqs, {"description": desc, "seed": c.seed}


def bench_config(c) -> run.BenchConfig:
    engine = EngineConfig.from_config(c.engine)  # batching, policy, C, prefetch: per run
    if c.real_grid not in ("full", "cache"):
        raise cli.ConfigError(f"real_grid must be full or cache, got {c.real_grid!r}")
    return run.BenchConfig(
        engine=engine,
        batching=cli.csv(c.batching),
        policies=cli.csv(c.policies),
        capacities=cli.ints(c.capacities) or None,
        real_grid=c.real_grid,
        real_prefetch=c.real_prefetch,
        profiles=cli.csv(c.profiles),
        scales=cli.csv(c.scales),
        sim_logs=c.sim_logs,
    )


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    c = cli.parse_config(CONFIG, argv, negated={"no_real_prefetch": "real_prefetch"})
    if c.model not in ("smollm2", "tiny"):
        raise cli.ConfigError(f"model must be smollm2 or tiny, got {c.model!r}")
    if c.compile_cache:
        jax.config.update("jax_compilation_cache_dir", c.compile_cache)
    out = Path(c.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if c.model == "tiny":
        sm = tiny_serve_model(seed=c.seed)
    else:
        recipe = on_the_fly_recipe(
            c.domains, calib_sequences=c.calib_sequences, calib_len=c.calib_len
        )
        sm = load_served(c.checkpoint or None, recipe=recipe)
        if sm.note:
            print(f"[model] {sm.note}")
    print(f"[model] {sm.source} ({time.perf_counter() - t0:.0f}s)")
    trace, info = build_trace(c, sm)
    tr.save_trace(out / "trace.jsonl", trace)
    reqs = run.requests_from_trace(trace, sm.tokenizer)
    print(f"[trace] {info['description']}")
    bc = bench_config(c)
    real = run.run_real(sm, reqs, bc, out)
    fit = run.cpu_calibration(sm, real)
    sim = run.run_sim(sm, reqs, real, bc, out)
    command = "python launch/serve_bench.py " + " ".join(argv)
    results = report.build_results(sm, bc, info, real, sim, fit, command)
    paths = report.write_outputs(results, out)
    print(f"[done] {time.perf_counter() - t0:.0f}s: {paths['report']}, {paths['results']}")
    return results


if __name__ == "__main__":
    cli.guarded(main)()
