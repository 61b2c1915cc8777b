"""Cache and batching policies on routed traces of a trained Read-ME (no model in the loop).

  python launch/serve_sim.py --checkpoint RUN/moe_trained --out_dir runs/serve_sim

The pre-gating router of the checkpoint routes real held-out text (validation split) of every
domain it was trained on: a request is a window of one validation document, its first
`prompt_len` tokens the prompt and the following tokens the generated ones (teacher-forced:
the real continuation stands in for sampled text; the router is causal, so these are the
experts the engine would see). Two traces: default (outputs lognormal median 10) and
decode-heavy (median 40, at most 80). For each:
  - hit ratios, C = 2..6: Belady (whole future), LRU, LFU, random, online Belady (what the
    engine knows: this step and the queued prompts), on the access sequence of the
    decode-prioritized schedule (paper Table 4 setting), and on that of expert-aware batching
    with the (first) expert cap;
  - batching: expert-aware (Algorithm 1) / cache-aware / decode- / prefill-prioritized at
    C = E/2 (online Belady) and C = E, and at C = E/2 expert- and cache-aware with each expert
    cap of --expert_caps (max_experts, serve/batching.py; default C), on the simulated A100 at
    Llama-2-7B scale (serve/bench/costmodel.py), on-demand loads; unique experts per batch, mean/p95
    normalized latency, throughput.
Writes OUT/<trace>.json, OUT/<trace>.md and the cache decision logs OUT/logs/*.jsonl (the
replayable format of serve/bench/replay.py).
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from readme_jax.checkpoints import store  # noqa: E402
from readme_jax.checkpoints.tokenizer import load_tokenizer  # noqa: E402
from readme_jax.data import pipeline  # noqa: E402
from readme_jax.eval import routing as rt  # noqa: E402
from readme_jax.model.readme import ReadMEConfig, route  # noqa: E402
from readme_jax.refactor.experts import ExpertSpec  # noqa: E402
from readme_jax.serve.bench import cachesim as cs  # noqa: E402
from readme_jax.serve.bench import costmodel as cm  # noqa: E402
from readme_jax.serve.bench.replay import write_log  # noqa: E402

_CKPT = flags.DEFINE_string("checkpoint", None, "Read-ME model directory (e.g. RUN/moe_trained).")
_OUT = flags.DEFINE_string("out_dir", "runs/serve_sim", "Where the JSON, markdown and logs go.")
_N = flags.DEFINE_integer("num_requests", 120, "Requests per trace.")
_RATE = flags.DEFINE_float("rate", 4.0, "Poisson arrivals per simulated second.")
_PROMPT = flags.DEFINE_list("prompt_len", ["32", "128"], "Prompt tokens, uniform [lo, hi].")
_SEED = flags.DEFINE_integer("seed", 0, "Trace seed.")
_CACHE = flags.DEFINE_string("cache", None, "Data cache (default $READEME_CACHE).")
_CAPS = flags.DEFINE_list("capacities", ["2", "3", "4", "5", "6"], "Cache slots for hit ratios.")
_XCAPS = flags.DEFINE_list(
    "expert_caps", [], "Expert caps (max_experts) of expert/cache batching at C = E/2 (default: C)."
)
POLICIES = ("belady", "lru", "lfu", "random", "online_belady")


def _domains(ckpt: Path) -> list[str]:
    return list(ExpertSpec.load(ckpt / "experts").domains)


def router_fn(params, rc: ReadMEConfig):
    """tokens [S] -> top-1 expert per token [S], padded to multiples of 256 (few compiles)."""
    fn = jax.jit(lambda p, t: route(p, t, rc)[1][0][..., 0])

    def run(w):
        pad = 256 * ((len(w) + 255) // 256)
        return np.asarray(fn(params, jnp.asarray(np.pad(w, (0, pad - len(w)))[None])))[0, : len(w)]

    return run


def cost_7b(ckpt: Path, rc: ReadMEConfig) -> cm.ModelCost:
    spec, m = ExpertSpec.load(ckpt / "experts"), rc.model
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


def run_trace(kind, reqs, E, mc, out: Path) -> dict:
    caps = [int(c) for c in _CAPS.value if int(c) < E]
    hw = cm.a100_pcie4(mc.layers)
    prompt = [np.asarray(r.prompt_experts) for r in reqs]
    whole = [np.asarray(r.prompt_experts + r.output_experts) for r in reqs]
    runs, traces = [], {}
    xcaps = [int(x) for x in _XCAPS.value] or [E // 2]
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


def _clock(hw, mc):
    return cm.CostClock(hw, mc, pipelined=False)


def markdown(res: dict) -> str:
    caps = sorted(int(c) for c in next(iter(res["hit_ratio"].values())))
    lines = [
        f"## {res['trace']} trace ({res['requests']} requests)",
        "",
        "| policy | " + " | ".join(f"C={c}" for c in caps) + " |",
        "|---" * (len(caps) + 1) + "|",
    ]
    for p, row in res["hit_ratio"].items():
        lines.append(f"| {p} | " + " | ".join(f"{100 * row[c]:.1f}%" for c in caps) + " |")
    if "hit_ratio_expert_capped" in res:
        lines += [
            "",
            "Hit ratios on the accesses of expert-aware batching with expert cap "
            f"{res.get('expert_cap_of_capped_hits', '')}:",
            "",
        ]
        lines += ["| policy | " + " | ".join(f"C={c}" for c in caps) + " |"]
        lines += ["|---" * (len(caps) + 1) + "|"]
        for p, row in res["hit_ratio_expert_capped"].items():
            lines.append(f"| {p} | " + " | ".join(f"{100 * row[c]:.1f}%" for c in caps) + " |")
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


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax's restore messages
    if not _CKPT.value:
        raise app.UsageError("--checkpoint is required (a Read-ME model directory)")
    ckpt, out = Path(_CKPT.value), Path(_OUT.value)
    meta = store.read_meta(ckpt)
    if meta.get("kind") != "readme_moe":
        print(f"error: {ckpt} is not a Read-ME model (kind {meta.get('kind')!r})", file=sys.stderr)
        return 2
    rc, params = ReadMEConfig.from_dict(meta["config"]), store.load_params(ckpt)
    tok, E = load_tokenizer(), rc.moe.num_experts
    bad = [x for x in _XCAPS.value if not (x.isdigit() and 1 <= int(x) < E)]
    if bad:
        raise app.UsageError(f"--expert_caps must be integers in [1, {E - 1}] ({E} experts): {bad}")
    streams = {
        d: (
            pipeline.load_tokens(d, "validation", tok, _CACHE.value),
            pipeline.load_offsets(d, "validation", tok, _CACHE.value),
        )
        for d in _domains(ckpt)
    }
    mc, rng = cost_7b(ckpt, rc), np.random.default_rng(_SEED.value)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    cmd = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    lo, hi = (int(x) for x in _PROMPT.value)
    route_fn = router_fn(params, rc)
    for kind in cs.OUTPUT_LENGTHS:
        reqs = cs.routed_requests(route_fn, streams, _N.value, _RATE.value, (lo, hi), kind, rng)
        res = run_trace(kind, reqs, E, mc, out) | {"command": cmd, "checkpoint": str(ckpt)}
        (out / f"{kind}.json").write_text(json.dumps(res, indent=1, default=_json))
        (out / f"{kind}.md").write_text(markdown(res))
        print(markdown(res))
    return 0


def _json(x):
    return x.item() if hasattr(x, "item") else str(x)


if __name__ == "__main__":
    app.run(main)
