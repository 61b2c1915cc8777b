"""Where a serving engine's time goes at saturation, and the engine's decode speed against the
static-batch Generator on the same model.

  reqs = saturation_requests(tokenizer, 48, prompt_len=(16, 32), output_len=(8, 16))
  best = run_engines(EngineConfig(num_slots=8, max_len=256), ("expert",), reqs, moe_sp, dense_sp)

Saturation: every request arrives at t = 0 (the queue is never empty, as in a server under
overload), so the figure is the engine's capacity: completion tokens per second of wall time,
plus where the time went (route_prompt at arrival, steps with prefill calls, decode-only steps by
the number of distinct experts their rows need). Read-ME runs with every expert resident, the
dense model through the same engine (serve/dense.py). Configurations alternate within each
round; the best round of each is reported.

`ffn_components` times the FFN alone (every layer, one jitted call, median of 30) on T = 8 rows
(a decode step of N = 8 slots) and T = 32 rows (one prefill chunk): how the FFN's time follows
its width. `bench_engine` compares the engine's decode-only steps with the Generator's.
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from readme_jax.decode.generator import Generator
from readme_jax.decode.steps import readme_model
from readme_jax.eval.speed import PROMPT, decode_step_time
from readme_jax.model import llama, moe
from readme_jax.serve.backend import ModelBackend
from readme_jax.serve.bench.trace import LengthDist, heldout_prompts, make_trace
from readme_jax.serve.config import EngineConfig
from readme_jax.serve.decode import ServeParams, graph_params, split_params
from readme_jax.serve.engine import Engine, ServeRequest, generate

DEFAULT_DOMAINS = ("fiction", "drama", "code_docs", "manual")


def saturation_requests(
    tokenizer,
    n: int,
    prompt_len: tuple[int, int],
    output_len: tuple[int, int],
    domains: Sequence[str] = DEFAULT_DOMAINS,
) -> list[ServeRequest]:
    """`n` greedy requests: prompts of prompt_len = (lo, hi) tokens (uniform) cut from held-out
    documents of `domains`, output lengths lognormal(median, sigma 0.6) clipped to [4, max] for
    output_len = (median, max): the mix of tools/load_test.py. Arrival times are ignored by
    `profile` (all at t = 0)."""
    (lo, hi), (med, mx) = prompt_len, output_len
    trace = make_trace(
        heldout_prompts(tokenizer, domains, hi),
        n,
        1.0,
        output_len=LengthDist("lognormal", lo=4, hi=mx, median=med, sigma=0.6),
        prompt_len=LengthDist("uniform", lo=lo, hi=hi),
        seed=0,
    )
    return [ServeRequest(t.id, list(t.prompt_tokens), t.max_new_tokens) for t in trace]


def profile(engine: Engine, reqs: list[ServeRequest]) -> dict:
    """Run `reqs` (all at t = 0) and split the wall time by kind of step: {"wall_s",
    "completion_tokens", "tok_s", "steps", "route_prompt_s", "by_kind": {kind: {"steps",
    "total_s", "median_s", "mean_decode_rows"}}}. The timing hook on the backend's
    route_prompt is removed afterwards."""
    backend = engine.backend
    route_s = [0.0]
    inner = backend.route_prompt

    def timed(req):
        t = time.perf_counter()
        out = inner(req)
        route_s[0] += time.perf_counter() - t
        return out

    backend.route_prompt = timed
    try:
        t0 = time.perf_counter()
        run = engine.run(reqs)
        wall = time.perf_counter() - t0
    finally:
        del backend.route_prompt
    toks = sum(len(r.tokens) for r in run.results)
    kinds: dict[str, list[float]] = defaultdict(list)
    rows: dict[str, list[int]] = defaultdict(list)
    for st in run.steps:
        if st["prefill"]:
            k = f"with {len(st['prefill'])} prefill"
        else:
            ex = {e for c in st["calls"] for e in c["experts"]}
            k = f"decode, {len(ex)} experts"
        kinds[k].append(st["wall_s"])
        rows[k].append(len(st["decode"]))
    return {
        "wall_s": wall,
        "completion_tokens": toks,
        "tok_s": toks / wall,
        "steps": len(run.steps),
        "route_prompt_s": route_s[0],
        "by_kind": {
            k: {
                "steps": len(v),
                "total_s": float(np.sum(v)),
                "median_s": float(np.median(v)),
                "mean_decode_rows": float(np.mean(rows[k])),
            }
            for k, v in sorted(kinds.items())
        },
    }


def run_engines(
    base: EngineConfig,
    batchings: Sequence[str],
    reqs: list[ServeRequest],
    moe_sp: ServeParams,
    dense_sp: ServeParams,
    rounds: int = 2,
    log=print,
) -> dict[str, dict]:
    """Best round of each engine configuration (Read-ME per batching policy, every expert
    resident; then dense with decode batching): {name: `profile` result + "vs_dense"}."""
    base = dataclasses.replace(base, capacity=None, cache_policy="all", prefetch=False)
    engines = {
        f"Read-ME, {b} batching": Engine(
            ModelBackend.for_config(moe_sp, base), dataclasses.replace(base, batching=b)
        )
        for b in batchings
    }
    engines["dense"] = Engine(
        ModelBackend.for_config(dense_sp, base), dataclasses.replace(base, batching="decode")
    )
    for name, eng in engines.items():  # compile every step shape once
        eng.run(reqs[:10])
        log(f"[profile] warmed up {name}")
    best: dict[str, dict] = {}
    for r in range(rounds):
        for name, eng in engines.items():
            res = profile(eng, reqs)
            log(
                f"[profile] round {r} {name}: {res['tok_s']:.2f} tok/s "
                f"({res['completion_tokens']} tokens, {res['wall_s']:.1f} s, "
                f"route_prompt {res['route_prompt_s']:.2f} s)"
            )
            if name not in best or res["tok_s"] > best[name]["tok_s"]:
                best[name] = res
    for res in best.values():
        res["vs_dense"] = res["tok_s"] / best["dense"]["tok_s"]
    return best


def _median_ms(f, *args, reps: int = 30) -> float:
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t)
    return 1e3 * float(np.median(ts))


def ffn_components(moe_sp: ServeParams, dense_params, rounds: int = 2) -> dict[str, float]:
    """Milliseconds of the FFN alone (all layers; median of 30 calls; best of `rounds`) at
    T = 8 and T = 32 rows, for the dense FFN and Read-ME's paths: {"T=8, dense": ms, ...}.
    Expert splits: k1 all rows on expert 0; T = 8: k2 (4 + 4), k4 (2 + 2 + 2 + 2); T = 32:
    k3 (22 + 7 + 3)."""
    moe_layers = graph_params(moe_sp)["backbone"]["layers"]
    dense_layers = [
        {"shared_gate_up": lp["w_gate_up"], "shared_down": lp["w_down"]}
        for lp in llama.unstack_layers(dense_params)["layers"]
    ]

    def stack(ffn):  # the layers in sequence, each output fed to the next (no dead code)
        def f(layers, x, *a):
            for lp in layers:
                x = x + 0.01 * ffn(lp, x, *a)
            return x

        return jax.jit(f)

    shared = stack(moe.shared_ffn)
    fused = stack(lambda lp, x, e: moe._switch_swiglu(e, lp["fused_gate_up"], lp["fused_down"], x))
    select = stack(
        lambda lp, x, e, w: (
            moe.select_experts(x, e, w, lp["expert_gate_up"], lp["expert_down"])
            + moe.shared_ffn(lp, x)
        )
    )
    splits = {8: {"k1": [8], "k2": [4, 4], "k4": [2, 2, 2, 2]}, 32: {"k1": [32], "k3": [22, 7, 3]}}
    out: dict[str, float] = {}
    for _ in range(rounds):
        for T, ks in splits.items():
            x = jax.random.normal(jax.random.key(0), (T, moe_sp.rc.model.dim), jnp.float32)
            got = {
                "dense": _median_ms(shared, dense_layers, x),
                "shared only": _median_ms(shared, moe_layers, x),
                "fused k1": _median_ms(fused, moe_layers, x, jnp.int32(0)),
            }
            w = jnp.ones((T, 1), jnp.float32)
            for k, counts in ks.items():
                e = jnp.asarray(np.repeat(np.arange(len(counts)), counts), jnp.int32)[:, None]
                got[f"select {k}"] = _median_ms(select, moe_layers, x, e, w)
            for name, ms in got.items():
                key = f"T={T}, {name}"
                out[key] = min(out.get(key, float("inf")), ms)
    return out


def bench_engine(rc, params, rounds: int = 3, steps: int = 40, max_len: int = 128, log=print):
    """Decode tokens/s of the serving engine (every expert resident) and of the Generator on
    the same Read-ME model and prompts, batch 1 and 8, in alternating rounds (best of each):
    {"generator_b1", "engine_b1", "ratio_b1", ... b8}. The engine's context is `max_len` (the
    Generator's bucket for a 32-token prompt + 40 tokens is 128). Both rates are batch / the
    median decode step (the engine's decode-only steps after the first)."""
    gen, sp = Generator(readme_model(rc), params), split_params(rc, params)
    best: dict[str, float] = {}
    backends = {}
    for b in (1, 8):
        ec = EngineConfig(num_slots=b, max_len=max_len, prefill_chunk=32)
        backends[b] = ModelBackend.for_config(sp, ec)
        generate(sp, [PROMPT] * b, 4, max_len=max_len, num_slots=b, backend=backends[b])
    for _ in range(rounds):
        for b in (1, 8):
            g = b / decode_step_time(gen, [PROMPT] * b, steps)
            out = generate(
                sp,
                [PROMPT] * b,
                steps,
                max_len=max_len,
                num_slots=b,
                backend=backends[b],
                prefetch=False,
            )
            best[f"generator_b{b}"] = max(best.get(f"generator_b{b}", 0.0), g)
            e = b / out.stats["decode_step_median_s"]  # the Generator's estimator: median step
            best[f"engine_b{b}"] = max(best.get(f"engine_b{b}", 0.0), e)
            log(f"[bench] engine vs Generator, batch {b}: {e:.1f} vs {g:.1f} tok/s")
    for b in (1, 8):
        best[f"ratio_b{b}"] = best[f"engine_b{b}"] / best[f"generator_b{b}"]
    return best
