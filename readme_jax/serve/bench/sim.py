"""Cache and batching policies on routed traces of a trained Read-ME (no model in the loop).

  results = simulate_checkpoint("RUN/moe_trained", "runs/serve_sim", SimSettings())

The pre-gating router of the checkpoint routes real held-out text (validation split) of every
domain it was trained on: a request is a window of one validation document, its first
`prompt_len` tokens the prompt and the following tokens the generated ones (teacher-forced:
the real continuation stands in for sampled text; the router is causal, so these are the
experts the engine would see). Two traces: default (outputs lognormal median 10) and
decode-heavy (median 40, at most 80). For each:
  - hit ratios at each capacity C of `capacities` (< E): Belady (whole future), LRU, LFU,
    random, online Belady (what the engine knows: this step and the queued prompts), on the
    access sequence of the decode-prioritized schedule (paper Table 4 setting), and on that of
    expert-aware batching with the (first) expert cap;
  - batching: expert-aware (Algorithm 1) / cache-aware / decode- / prefill-prioritized at
    C = E/2 (online Belady) and C = E, and at C = E/2 expert- and cache-aware with each expert
    cap of `expert_caps` (default C), on the simulated A100 at Llama-2-7B scale
    (serve/bench/costmodel.py), on-demand loads; unique experts per batch, mean/p95 normalized
    latency (s/token), throughput (tokens/s).
Writes OUT/<trace>.json, OUT/<trace>.md and the cache decision logs OUT/logs/*.jsonl (the
replayable format of serve/bench/replay.py).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from readme_jax.checkpoints import models
from readme_jax.checkpoints.tokenizer import load_tokenizer
from readme_jax.data import pipeline
from readme_jax.eval import routing as rt
from readme_jax.model.config import ConfigError, ReadMEConfig
from readme_jax.model.readme import route
from readme_jax.model.spec import ExpertSpec
from readme_jax.serve.bench import cachesim as cs
from readme_jax.serve.bench import costmodel as cm
from readme_jax.serve.bench.replay import write_log

POLICIES = ("belady", "lru", "lfu", "random", "online_belady")


@dataclasses.dataclass(frozen=True)
class SimSettings:
    num_requests: int = 120  # per trace
    rate: float = 4.0  # Poisson arrivals per simulated second
    prompt_len: tuple[int, int] = (32, 128)  # prompt tokens, uniform [lo, hi]
    seed: int = 0
    cache: str | None = None  # data cache directory (None: the default)
    capacities: tuple[int, ...] = (2, 3, 4, 5, 6)  # C values of the hit-ratio tables
    expert_caps: tuple[int, ...] = ()  # caps of expert/cache batching at C = E/2 (() = C)


def router_fn(params, rc: ReadMEConfig) -> Callable[[np.ndarray], np.ndarray]:
    """tokens [S] -> top-1 expert per token [S], padded to multiples of 256 (few compiles)."""
    fn = jax.jit(lambda p, t: route(p, t, rc)[1][0][..., 0])

    def run(w):
        pad = 256 * ((len(w) + 255) // 256)
        return np.asarray(fn(params, jnp.asarray(np.pad(w, (0, pad - len(w)))[None])))[0, : len(w)]

    return run


def cost_7b(spec: ExpertSpec, rc: ReadMEConfig) -> cm.ModelCost:
    """The cost model of this Read-ME's shapes scaled to Llama-2-7B (bf16)."""
    m = rc.model
    base = cm.ModelCost(
        "served",
        m.n_layers,
        m.dim,
        m.n_heads,
        m.n_kv_heads,
        m.head_dim,
        m.vocab_size,
        ffn=m.ffn_dim,
        shared_width=int(spec.shared_widths.max()),
        expert_width=int(spec.expert_widths.max()),
        top_k=rc.moe.top_k,
    )
    return cm.scaled_cost(base, "Read-ME at Llama-2-7B scale (bf16)", **cm.LLAMA2_7B)


def _clock(hw, mc) -> cm.CostClock:
    return cm.CostClock(hw, mc, pipelined=False)


def run_trace(kind: str, reqs, E: int, mc: cm.ModelCost, out: Path, s: SimSettings) -> dict:
    """Hit ratios and batching runs of one routed trace (module doc); writes the cache logs
    under out/logs/ and returns the trace's results."""
    caps = [c for c in s.capacities if c < E]
    hw = cm.a100_pcie4(mc.layers)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    prompt = [np.asarray(r.prompt_experts) for r in reqs]
    whole = [np.asarray(r.prompt_experts + r.output_experts) for r in reqs]
    runs, traces = [], {}
    xcaps = list(s.expert_caps) or [E // 2]
    for C in (E // 2, E):
        # the expert cap (serve.batching), by default C: a batch fits the cache in one wave
        capped = [(b, x) for x in xcaps for b in ("expert", "cache")] if C < E else []
        for b, cap in [(b, None) for b in ("expert", "cache", "decode", "prefill")] + capped:
            cfg = cs.SimConfig(b, "online_belady" if C < E else "lru", C, E, max_experts=cap)
            res = cs.simulate(reqs, cfg, _clock(hw, mc))
            name = f"{kind}-{b}-C{C}" + (f"-cap{cap}" if cap else "")
            traces[name] = res["trace"]
            write_log(out / "logs" / f"{name}.jsonl", res["cache_log"])
            runs.append(
                {"name": name, "log": f"logs/{name}.jsonl"}
                | {k: v for k, v in res.items() if k not in ("trace", "cache_log")}
            )
    # cache policies replayed on the accesses of decode-prioritized batching at C = E/2 (paper
    # Table 4 setting) and of expert-aware batching capped there (the first cap)
    hits = cs.hit_ratios(traces[f"{kind}-decode-C{E // 2}"], POLICIES, caps, E)
    hits_capped = cs.hit_ratios(traces[f"{kind}-expert-C{E // 2}-cap{xcaps[0]}"], POLICIES, caps, E)
    return {
        "trace": kind,
        "requests": len(reqs),
        "prompt_tokens": int(sum(len(r.prompt_experts) for r in reqs)),
        "generated_tokens": int(sum(r.max_new_tokens for r in reqs)),
        "locality": {
            "prompt": rt.temporal_locality(prompt).to_dict(),
            "whole requests": rt.temporal_locality(whole).to_dict(),
        },
        "hit_ratio": hits,
        "hit_ratio_expert_capped": hits_capped,
        "expert_cap_of_capped_hits": xcaps[0],
        "online_gap_points": {
            C: 100 * (hits["belady"][C] - hits["online_belady"][C]) for C in caps
        },
        "batching": runs,
        "hardware": dataclasses.asdict(hw),
        "model_cost": mc.to_dict(),
    }


def _hit_table(rows: dict, caps: list[int]) -> list[str]:
    lines = ["| policy | " + " | ".join(f"C={c}" for c in caps) + " |"]
    lines += ["|---" * (len(caps) + 1) + "|"]
    for p, row in rows.items():
        lines.append(f"| {p} | " + " | ".join(f"{100 * row[c]:.1f}%" for c in caps) + " |")
    return lines


def markdown(res: dict) -> str:
    """The tables of one trace's results (`run_trace`)."""
    caps = sorted(int(c) for c in next(iter(res["hit_ratio"].values())))
    lines = [f"## {res['trace']} trace ({res['requests']} requests)", ""]
    lines += _hit_table(res["hit_ratio"], caps)
    if "hit_ratio_expert_capped" in res:
        lines += [
            "",
            "Hit ratios on the accesses of expert-aware batching with expert cap "
            f"{res.get('expert_cap_of_capped_hits', '')}:",
            "",
        ]
        lines += _hit_table(res["hit_ratio_expert_capped"], caps)
    lines += [
        "",
        "| batching | expert cap | C | uniq. experts/batch | mean / p95 norm. latency (s/token) "
        "| throughput (tok/s) | hit ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in res["batching"]:
        c, hit = r["config"], 100 * r["cache"]["hit_ratio"]
        cap = c.get("max_experts") or "–"
        lines.append(
            f"| {c['batching']} | {cap} | {c['capacity']} | {r['mean_unique_experts']:.2f} | "
            f"{r['mean_norm_latency_s']:.4f} / {r['p95_norm_latency_s']:.4f} | "
            f"{r['throughput_tok_s']:.1f} | {hit:.1f}% |"
        )
    loc = res["locality"]["whole requests"]
    lines += [
        "",
        f"Temporal locality of the routed requests: {100 * loc['keep_fraction']:.1f}% "
        f"({loc['n_kept']:,}/{loc['n_pairs']:,} consecutive pairs keep their expert; mean run "
        f"{loc['mean_run_length']:.1f} tokens)",
    ]
    return "\n".join(lines) + "\n"


def validation_streams(domains, tokenizer, cache: str | None = None) -> dict[str, tuple]:
    """domain -> (tokens, document offsets) of its validation split."""
    return {
        d: (
            pipeline.load_tokens(d, "validation", tokenizer, cache),
            pipeline.load_offsets(d, "validation", tokenizer, cache),
        )
        for d in domains
    }


def _json(x):
    return x.item() if hasattr(x, "item") else str(x)


def simulate_checkpoint(
    checkpoint: str | Path, out: str | Path, s: SimSettings, command: str = "", log=print
) -> dict[str, dict]:
    """Both traces (cachesim.OUTPUT_LENGTHS) of the Read-ME model at `checkpoint`, routed on
    its domains' validation text: writes OUT/<trace>.json, .md and logs; returns {trace:
    results}. Raises CheckpointError for a path without a Read-ME model, ConfigError for an
    expert cap outside [1, E)."""
    ckpt, out = Path(checkpoint), Path(out)
    m = models.load_readme(ckpt)
    E = m.rc.moe.num_experts
    bad = [x for x in s.expert_caps if not 1 <= x < E]
    if bad:
        raise ConfigError(f"expert caps must be integers in [1, {E - 1}] ({E} experts): {bad}")
    streams = validation_streams(m.spec.domains, load_tokenizer(), s.cache)
    mc, rng = cost_7b(m.spec, m.rc), np.random.default_rng(s.seed)
    route_fn = router_fn(m.params, m.rc)
    results = {}
    for kind in cs.OUTPUT_LENGTHS:
        reqs = cs.routed_requests(
            route_fn, streams, s.num_requests, s.rate, s.prompt_len, kind, rng
        )
        res = run_trace(kind, reqs, E, mc, out, s) | {"command": command, "checkpoint": str(ckpt)}
        (out / f"{kind}.json").write_text(json.dumps(res, indent=1, default=_json))
        (out / f"{kind}.md").write_text(markdown(res))
        log(markdown(res))
        results[kind] = res
    return results
