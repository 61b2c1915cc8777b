"""Serving benchmark results and report: results.json (eval/report.py's schema: "meta",
"routing", "serving", plus "serve_bench") and report.md with plots (written by
`eval/report.py:write_report`), followed by the serving tables below. Formatting helpers
(`fmt`, `jsonable`) are eval/report.py's.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from readme_jax.eval.report import NA, fmt, jsonable, write_report
from readme_jax.eval.routing import temporal_locality
from readme_jax.serve.bench.replay import run_cache
from readme_jax.serve.cache import make_policy
from readme_jax.serve.engine import RunResult


def locality(ref: RunResult) -> dict:
    ok = [r for r in ref.results if r.status == "ok"]
    prompt = [np.asarray(r.prompt_experts, np.int64)[:, 0] for r in ok]
    gen = [
        np.asarray(r.experts, np.int64).reshape(-1, max(1, len(r.experts[0]) if r.experts else 1))[
            :, 0
        ]
        for r in ok
        if r.experts
    ]
    both = [np.concatenate([p, g]) for p, g in zip(prompt, gen, strict=False)]
    return {
        "prompt tokens": temporal_locality(prompt).to_dict(),
        "generated tokens": temporal_locality(gen).to_dict(),
        "whole sequences": temporal_locality(both).to_dict(),
    }


def trace_hit_ratios(steps: list[dict], policies, caps, E: int) -> dict:
    """Every policy on one expert-request sequence (the reference run's calls, in order; each
    cut into waves of C), Belady with the whole future known: the paper's Table 4 setting."""
    reqs = [c["experts"] for s in steps for c in s["calls"]]
    out = {}
    for p in policies:
        for C in caps:
            pol = make_policy(p, **({"seed": 0} if p == "random" else {}))
            out.setdefault(p, {})[C] = run_cache(pol, reqs, C, num_experts=E).stats.hit_ratio
    return out


def _pick(runs, **kw) -> dict | None:
    for r in runs:
        if all(r.get(k) == v for k, v in kw.items()):
            return r
    return None


def _online_hit(rruns: list[dict]) -> dict:
    """Hit ratio of each policy in its own engine run (expert batching, on demand)."""
    online: dict = {}
    for r in rruns:
        if r["batching"] == "expert" and r["policy"] != "all" and not r["prefetch"]:
            online.setdefault(r["policy"], {})[r["capacity"]] = r["hit_ratio"]
            if r["policy"] == "belady":
                best = online.setdefault("belady (offline optimum)", {})
                best[r["capacity"]] = r["oracle_hit_ratio"]
    return online


def _latency(rruns: list[dict], sim: dict, bc, caps: list[int]) -> dict:
    """Per-request normalized latencies: the measured all-resident runs, and the first
    profile's simulated Belady + prefetch runs at the largest capacity."""
    latency = {}
    for r in rruns:
        if r["policy"] == "all":
            latency[f"{r['batching']} (CPU, measured)"] = r["latencies"]
    key = (bc.profiles[0], bc.scales[-1]) if bc.profiles and bc.scales else None
    if key and sim:
        for b in bc.batching:
            s = _pick(
                sim["runs"],
                profile=key[0],
                scale=key[1],
                batching=b,
                policy="belady",
                capacity=max(caps),
                prefetch=True,
            )
            if s:
                latency[f"{b} ({key[0]} sim, {key[1]}, belady C={max(caps)})"] = s["latencies"]
    return latency


SUMMARY_KEYS = (
    "unique_experts_per_batch",
    "mean_norm_latency_s",
    "p95_norm_latency_s",
    "throughput_tok_s",
    "hit_ratio",
    "bytes_per_token",
    "steps",
)


def build_results(sm, bc, trace_info, real, sim, cpu_fit, command: str) -> dict:
    """The results dict: report.py's schema ("serving", "routing", "meta") plus "serve_bench"."""
    E = sm.params.num_experts
    rruns = real["runs"]
    caps = list(bc.capacities or range(2, E)) or [1]
    hit = trace_hit_ratios(rruns[0]["_steps"], bc.policies, caps, E)
    latency = _latency(rruns, sim, bc, caps)
    summary = {f"CPU {r['name']}": {k: r[k] for k in SUMMARY_KEYS} for r in rruns}
    strip = lambda r: {k: v for k, v in r.items() if not k.startswith("_")}
    return {
        "meta": {
            "title": "Read-ME serving benchmark",
            "command": command,
            "checkpoint": sm.source,
            "created": time.strftime("%Y-%m-%d %H:%M:%S"),
            "notes": [f"{E} experts; trace: {trace_info['description']}"],
        },
        "routing": {"locality": locality(real["reference"])},
        "serving": {"hit_ratio": hit, "latency": latency, "summary": summary},
        "serve_bench": {
            "config": jsonable(dataclasses.asdict(bc)),
            "trace": trace_info,
            "outputs_identical": all(r["outputs_match_reference"] for r in rruns),
            "hit_ratio_online": _online_hit(rruns),
            "real": [strip(r) for r in rruns],
            "sim": sim,
            "cpu_fit": {k: v for k, v in cpu_fit.items() if k != "hardware"},
        },
    }


def _delta(x, base):
    return NA if not base or x is None else f"{100 * (x / base - 1):+.1f}%"


def batching_md(runs: list[dict], title: str, **filt) -> str:
    rows = {r["batching"]: r for r in runs if all(r.get(k) == v for k, v in filt.items())}
    if not rows:
        return ""
    base = rows.get("decode")
    out = [
        f"#### {title}\n",
        "| batching | unique experts / batch | mean norm. latency (s/token) "
        "| vs decode-prio. | p95 | vs decode-prio. | throughput (tok/s) | hit ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for b, r in rows.items():
        m, p = r["mean_norm_latency_s"], r["p95_norm_latency_s"]
        out.append(
            f"| {b} | {fmt(r['unique_experts_per_batch'], 2)} | {fmt(m, 4)} | "
            f"{_delta(m, base and base['mean_norm_latency_s'])} | {fmt(p, 4)} | "
            f"{_delta(p, base and base['p95_norm_latency_s'])} | "
            f"{fmt(r['throughput_tok_s'], 1)} | {fmt(100 * r['hit_ratio'], 1)}% |"
        )
    return "\n".join(out) + "\n"


def prefetch_md(runs: list[dict], title: str, **filt) -> str:
    sel = [r for r in runs if all(r.get(k) == v for k, v in filt.items())]
    pairs = {}
    for r in sel:
        pairs.setdefault((r["policy"], r["capacity"]), {})[r["prefetch"]] = r
    out = [
        f"#### {title}\n",
        "| policy | C | on-demand mean norm. latency | prefetch | change | "
        "on-demand p95 | prefetch p95 |",
        "|---|---|---|---|---|---|---|",
    ]
    for (p, c), d in sorted(pairs.items()):
        if False in d and True in d:
            a, b = d[False], d[True]
            out.append(
                f"| {p} | {c} | {fmt(a['mean_norm_latency_s'], 4)} | "
                f"{fmt(b['mean_norm_latency_s'], 4)} | "
                f"{_delta(b['mean_norm_latency_s'], a['mean_norm_latency_s'])} | "
                f"{fmt(a['p95_norm_latency_s'], 4)} | {fmt(b['p95_norm_latency_s'], 4)} |"
            )
    return "\n".join(out) + "\n" if len(out) > 3 else ""


def _hit_md(hit: dict) -> str:
    if not hit:
        return ""
    caps = sorted({int(c) for v in hit.values() for c in v})
    rows = [
        "#### Hit ratio in the engine (expert batching)\n",
        "| policy | " + " | ".join(f"C={c}" for c in caps) + " |",
        "|---|" + "---|" * len(caps),
    ]
    for p, v in hit.items():
        byc = {int(c): r for c, r in v.items()}
        rows.append(
            f"| {p} | "
            + " | ".join(fmt(100 * byc[c], 1) + "%" if c in byc else NA for c in caps)
            + " |"
        )
    return "\n".join(rows) + "\n"


def extra_markdown(results: dict) -> str:
    """The serving sections appended to eval/report.py's report.md."""
    sb = results["serve_bench"]
    real = sb["real"]
    caps = sorted({r["capacity"] for r in real if r["policy"] != "all"})
    md = _real_md(sb, caps) + _fit_md(sb["cpu_fit"]) + _sim_md(sb, caps)
    return "\n".join(x for x in md if x)


def _real_md(sb: dict, caps: list[int]) -> list[str]:
    real = sb["real"]
    E = max(r["capacity"] for r in real)
    md = [
        "",
        "## Serving benchmark details\n",
        f"Outputs identical across every real run (batching, cache policy, capacity, "
        f"prefetch): **{sb['outputs_identical']}**.\n",
        "Every run's cache decisions are in `logs/`; `replay.replay_check(replay.read_log(p))` "
        "re-derives its hit ratio.\n",
        "The hit-ratio table above replays every policy on one expert-request sequence (the "
        "reference run's, all experts resident), Belady seeing the whole future. In the engine "
        "below, each policy serves its own schedule (wall-clock timing changes the batches) "
        "and online Belady only sees the step's later waves, the decoding requests' current "
        "experts and the queued prompts.\n",
        "### Real engine (CPU, wall clock)\n",
        _hit_md(sb.get("hit_ratio_online") or {}),
        batching_md(real, "Batching, all experts resident", policy="all"),
    ]
    if caps:
        md.append(
            batching_md(
                real,
                f"Batching, Belady C={caps[-1]} of {E}",
                policy="belady",
                capacity=caps[-1],
                prefetch=False,
            )
        )
        md.append(
            prefetch_md(
                real,
                "Prefetch vs on-demand (real, expert batching)",
                batching="expert",
                policy="belady",
            )
        )
    return md


def _fit_md(fit: dict) -> list[str]:
    return [
        "### Cost model calibration on this CPU\n",
        f"Non-negative least squares over {fit['steps']} measured steps: per-step host cost "
        f"{1e3 * fit['step_s']:.1f} ms, per-call overhead {1e3 * fit['launch_s']:.1f} ms, "
        f"effective bandwidth {fit['bandwidth_Bps'] / 1e9:.2f} "
        f"GB/s, compute {fit['flops'] / 1e9:.1f} GFLOP/s, load rate {fit['link_Bps'] / 1e9:.2f} "
        f"GB/s; R² = {fit['r2']:.3f}. The reference run: predicted "
        f"{fit['reference_predicted_s']:.1f} s, measured {fit['reference_measured_s']:.1f} s.\n",
    ]


def _sim_md(sb: dict, caps: list[int]) -> list[str]:
    sim = sb.get("sim") or {"runs": [], "profiles": {}}
    md = [
        "### Simulated accelerators\n",
        "Same engine and requests (replayed tokens and experts), step times from the cost "
        "model in `readme_jax/serve/bench/costmodel.py`; arrivals rescaled by each profile's "
        "speed-up over the measured CPU so the load is comparable.\n",
    ]
    for key, prof in sim["profiles"].items():
        p, s = key.split("/")
        hw, mc = prof["hardware"], prof["model"]
        md.append(
            f"**{hw['name']}, {mc['name']}** (expert {mc['bytes_per_expert'] / 1e6:.0f} MB, "
            f"dense {mc['dense_bytes'] / 1e6:.0f} MB, link {hw['link_bw'] / 1e9:.0f} GB/s, "
            f"arrival time x{prof['arrival_time_scale']:.3g})\n"
        )
        for c in caps[-1:]:
            md.append(
                batching_md(
                    sim["runs"],
                    f"{key}: batching, Belady C={c}, prefetch",
                    profile=p,
                    scale=s,
                    policy="belady",
                    capacity=c,
                    prefetch=True,
                )
            )
        md.append(
            prefetch_md(
                sim["runs"],
                f"{key}: prefetch vs on-demand, expert batching",
                profile=p,
                scale=s,
                batching="expert",
            )
        )
    return md


def write_outputs(results: dict, out_dir: Path) -> dict:
    paths = write_report(results, out_dir)
    with open(paths["report"], "a") as f:
        f.write(extra_markdown(results))
    return paths
