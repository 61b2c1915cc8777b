"""Serving benchmark: a trace replayed under every batching x cache policy x capacity, on the
real engine (measured wall time) and on a simulated accelerator (cost model). Used by
`launch/serve_bench.py`; see there for the command line.

Outputs in `out_dir`: results.json and report.md with plots (via eval/report.py, plus the serving
tables below), trace.jsonl, and per run logs/<run>.cache.jsonl (the cache decision log:
`cache.replay_check(cache.read_log(path))` re-derives its counters) and logs/<run>.steps.jsonl
(per step: the batch, the experts it needed, its calls with their waves of experts, hits and
loads, prefetches, time).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from readme_jax.serve import costmodel as cm
from readme_jax.serve.backend import ModelBackend, ReplayBackend
from readme_jax.serve.cache import Belady, make_policy, replay_check, run_cache, write_log
from readme_jax.serve.engine import Engine, EngineConfig, RunResult, ServeRequest
from readme_jax.serve.trace import TraceRequest


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    engine: EngineConfig = EngineConfig(num_slots=8, max_len=128, max_batch_tokens=32)
    batching: tuple[str, ...] = ("expert", "decode", "prefill")
    policies: tuple[str, ...] = ("belady", "lru", "lfu", "random")
    capacities: tuple[int, ...] | None = None  # None: 2 .. E-1
    real_grid: str = "cache"  # full: every batching x policy x C; cache: policies x C on expert
    real_prefetch: bool = True  # also belady + prefetch (expert batching) on the real engine
    profiles: tuple[str, ...] = ("a100", "h200")
    scales: tuple[str, ...] = ("served", "llama2-7b")
    sim_logs: bool = False  # also dump the decision logs of simulated runs


def requests_from_trace(trace: Sequence[TraceRequest], tokenizer=None) -> list[ServeRequest]:
    out = []
    for r in trace:
        toks = r.prompt_tokens
        if toks is None:
            if tokenizer is None:
                raise ValueError(f"trace request {r.id} has a text prompt but no tokenizer")
            toks = tokenizer.encode(r.prompt)
        out.append(ServeRequest(r.id, list(toks), r.max_new_tokens, r.arrival_s, seed=r.id))
    return out


def _name(batching: str, policy: str, C: int, prefetch: bool) -> str:
    return f"{batching}-{policy}-C{C}" + ("-prefetch" if prefetch else "")


def _write_logs(run: RunResult, logdir: Path, name: str) -> dict:
    logdir.mkdir(parents=True, exist_ok=True)
    write_log(logdir / f"{name}.cache.jsonl", run.cache_log)
    write_log(logdir / f"{name}.steps.jsonl", run.steps)
    st = replay_check(run.cache_log)  # the dumped log must re-derive the reported counters
    if (st.hits, st.misses, st.loads) != (
        run.cache_stats.hits,
        run.cache_stats.misses,
        run.cache_stats.loads,
    ):
        raise RuntimeError(f"{name}: replayed counters {st} differ from {run.cache_stats}")
    return {
        "cache_log": f"logs/{logdir.name}/{name}.cache.jsonl",
        "replayed_hit_ratio": st.hit_ratio,
    }


def oracle_hit_ratio(log: list[dict], capacity: int) -> float:
    """Belady with the whole access sequence known (offline optimum) on the same waves."""
    waves: dict[tuple[int, int], list[int]] = {}
    for rec in log:
        if rec["kind"] == "access":
            waves.setdefault((rec["step"], rec["wave"]), []).append(rec["expert"])
    seq = [waves[k] for k in sorted(waves)]
    E = log[0]["num_experts"]
    return run_cache(Belady(), seq, capacity, num_experts=E).stats.hit_ratio


def _grid(bc: BenchConfig, E: int, real: bool) -> list[tuple[str, str, int, bool]]:
    caps = list(bc.capacities or range(2, E)) or [1]
    grid = [(b, "all", E, False) for b in bc.batching]
    cache_batching = bc.batching if (not real or bc.real_grid == "full") else ("expert",)
    modes = (False, True) if not real else (False,)
    grid += [(b, p, c, m) for b in cache_batching for p in bc.policies for c in caps for m in modes]
    if real and bc.real_prefetch:
        grid += [("expert", "belady", c, True) for c in caps]
    return grid


def run_real(sm, reqs, bc: BenchConfig, out_dir: Path, log: Callable = print) -> dict:
    """Every configuration on the real engine; returns runs and the reference records."""
    sp = sm.params
    E = sp.num_experts
    backend = ModelBackend.for_config(sp, bc.engine)
    t0 = time.perf_counter()
    warm = [ServeRequest(-1, list(reqs[0].prompt[: bc.engine.prefill_chunk + 1]), 2)]
    for C in sorted({c for _, _, c, _ in _grid(bc, E, True)}):
        pol = "all" if C >= E else "lru"
        Engine(backend, dataclasses.replace(bc.engine, cache_policy=pol, capacity=C)).run(warm)
    log(f"[real] compiled prefill/decode for every capacity in {time.perf_counter() - t0:.0f}s")
    runs, ref = [], None
    for b, p, C, pf in _grid(bc, E, True):
        cfg = dataclasses.replace(bc.engine, batching=b, cache_policy=p, capacity=C, prefetch=pf)
        name = _name(b, p, C, pf)
        t = time.perf_counter()
        run = Engine(backend, cfg).run(reqs)
        toks = {r.id: r.tokens for r in run.results}
        if ref is None:
            ref = run
        entry = {"name": name, "batching": b, "policy": p, "capacity": C, "prefetch": pf}
        entry |= run.summary() | _write_logs(run, out_dir / "logs" / "real", name)
        entry["outputs_match_reference"] = toks == {r.id: r.tokens for r in ref.results}
        if p != "all":
            entry["oracle_hit_ratio"] = oracle_hit_ratio(run.cache_log, C)
        entry["latencies"] = [
            x.normalized_latency for x in run.results if x.normalized_latency is not None
        ]
        entry["_steps"] = run.steps
        runs.append(entry)
        log(
            f"[real] {name:28s} {time.perf_counter() - t:6.1f}s  hit {entry['hit_ratio']:.3f}  "
            f"uniq {entry['unique_experts_per_batch']:.2f}  norm lat "
            f"{entry['mean_norm_latency_s']:.3f}s  {entry['throughput_tok_s']:.1f} tok/s"
        )
    return {"runs": runs, "reference": ref}


def _scales(sp, bc: BenchConfig) -> dict[str, cm.ModelCost]:
    base = cm.model_cost(sp, "served model")
    out = {}
    for s in bc.scales:
        if s == "served":
            out[s] = base
        elif s == "llama2-7b":
            out[s] = cm.scaled_cost(base, "Llama-2-7B dims, bf16", **cm.LLAMA2_7B)
        else:
            raise ValueError(f"unknown sim scale {s!r}; choose served or llama2-7b")
    return out


def run_sim(sm, reqs, real: dict, bc: BenchConfig, out_dir: Path, log: Callable = print) -> dict:
    """Every configuration on the replay backend with cost-model clocks."""
    sp, ref = sm.params, real["reference"]
    E = sp.num_experts
    records = {r.id: r for r in ref.results}
    ref_steps = real["runs"][0]["_steps"]
    out = {"runs": [], "profiles": {}}
    for scale, mc in _scales(sp, bc).items():
        for prof in bc.profiles:
            hw = cm.PROFILES[prof](mc.layers)
            clk = cm.CostClock(hw, mc, pipelined=False)
            sim_ref = sum(clk.duration(s, 0.0, 0.0) for s in ref_steps)
            speedup = sum(s["wall_s"] for s in ref_steps) / max(sim_ref, 1e-12)
            sreqs = [dataclasses.replace(r, arrival_s=r.arrival_s / speedup) for r in reqs]
            key = f"{prof}/{scale}"
            out["profiles"][key] = {
                "hardware": dataclasses.asdict(hw),
                "model": mc.to_dict(),
                "arrival_time_scale": 1 / speedup,
            }
            backend = ReplayBackend(
                records,
                num_experts=E,
                top_k=sp.rc.moe.top_k,
                eos_ids=sp.rc.model.eos_ids,
                vocab_size=sp.rc.model.vocab_size,
                bytes_per_expert=mc.bytes_per_expert,
                num_slots=bc.engine.num_slots,
            )
            t = time.perf_counter()
            for b, p, C, pf in _grid(bc, E, False):
                cfg = dataclasses.replace(
                    bc.engine, batching=b, cache_policy=p, capacity=C, prefetch=pf
                )
                run = Engine(backend, cfg, cm.CostClock(hw, mc, pipelined=pf)).run(sreqs)
                name = _name(b, p, C, pf)
                entry = {
                    "name": name,
                    "profile": prof,
                    "scale": scale,
                    "batching": b,
                    "policy": p,
                    "capacity": C,
                    "prefetch": pf,
                } | run.summary()
                entry["latencies"] = [
                    r.normalized_latency for r in run.results if r.normalized_latency is not None
                ]
                if bc.sim_logs:
                    entry |= _write_logs(run, out_dir / "logs" / f"sim-{prof}-{scale}", name)
                out["runs"].append(entry)
            log(f"[sim] {key}: {len(_grid(bc, E, False))} runs in {time.perf_counter() - t:.1f}s")
    return out


def locality(ref: RunResult) -> dict:
    from readme_jax.eval.routing import temporal_locality

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


def build_results(sm, bc, trace_info, real, sim, cpu_fit, command: str) -> dict:
    """The results dict: report.py's schema ("serving", "routing", "meta") plus "serve_bench"."""
    E = sm.params.num_experts
    rruns = real["runs"]
    online = {}
    for r in rruns:
        if r["batching"] == "expert" and r["policy"] != "all" and not r["prefetch"]:
            online.setdefault(r["policy"], {})[r["capacity"]] = r["hit_ratio"]
            if r["policy"] == "belady":
                online.setdefault("belady (offline optimum)", {})[r["capacity"]] = r[
                    "oracle_hit_ratio"
                ]
    caps0 = list(bc.capacities or range(2, E)) or [1]
    hit = trace_hit_ratios(rruns[0]["_steps"], bc.policies, caps0, E)
    latency = {}
    for r in rruns:
        if r["policy"] == "all":
            latency[f"{r['batching']} (CPU, measured)"] = r["latencies"]
    key = (bc.profiles[0], bc.scales[-1]) if bc.profiles and bc.scales else None
    caps = list(bc.capacities or range(2, E)) or [1]
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
    summary = {}
    for r in rruns:
        summary[f"CPU {r['name']}"] = {
            k: r[k]
            for k in (
                "unique_experts_per_batch",
                "mean_norm_latency_s",
                "p95_norm_latency_s",
                "throughput_tok_s",
                "hit_ratio",
                "bytes_per_token",
                "steps",
            )
        }
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
            "config": _jsonable(dataclasses.asdict(bc)),
            "trace": trace_info,
            "outputs_identical": all(r["outputs_match_reference"] for r in rruns),
            "hit_ratio_online": online,
            "real": [strip(r) for r in rruns],
            "sim": sim,
            "cpu_fit": {k: v for k, v in cpu_fit.items() if k != "hardware"},
        },
    }


def _jsonable(x):
    return json.loads(json.dumps(x, default=str))


# ----------------------------------------------------------------------------- report


def cpu_calibration(sm, real: dict) -> dict:
    """Fit the cost model to every measured real step; check it on the reference run."""
    mc = cm.model_cost(sm.params)
    steps = [s for r in real["runs"] for s in r["_steps"]]
    fit = cm.fit_cpu(steps, mc)
    ref = real["runs"][0]["_steps"]
    clk = cm.CostClock(fit["hardware"], mc, pipelined=False)
    fit["reference_predicted_s"] = sum(clk.duration(s, 0.0, 0.0) for s in ref)
    fit["reference_measured_s"] = sum(s["wall_s"] for s in ref)
    return fit


def _fmt(x, d=3):
    return "–" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.{d}f}"


def _delta(x, base):
    return "–" if not base or x is None else f"{100 * (x / base - 1):+.1f}%"


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
            f"| {b} | {_fmt(r['unique_experts_per_batch'], 2)} | {_fmt(m, 4)} | "
            f"{_delta(m, base and base['mean_norm_latency_s'])} | {_fmt(p, 4)} | "
            f"{_delta(p, base and base['p95_norm_latency_s'])} | "
            f"{_fmt(r['throughput_tok_s'], 1)} | {_fmt(100 * r['hit_ratio'], 1)}% |"
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
                f"| {p} | {c} | {_fmt(a['mean_norm_latency_s'], 4)} | "
                f"{_fmt(b['mean_norm_latency_s'], 4)} | "
                f"{_delta(b['mean_norm_latency_s'], a['mean_norm_latency_s'])} | "
                f"{_fmt(a['p95_norm_latency_s'], 4)} | {_fmt(b['p95_norm_latency_s'], 4)} |"
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
            + " | ".join(_fmt(100 * byc[c], 1) + "%" if c in byc else "–" for c in caps)
            + " |"
        )
    return "\n".join(rows) + "\n"


def extra_markdown(results: dict) -> str:
    sb = results["serve_bench"]
    real, sim = sb["real"], sb.get("sim") or {"runs": [], "profiles": {}}
    E = max(r["capacity"] for r in real)
    md = [
        "",
        "## Serving benchmark details\n",
        f"Outputs identical across every real run (batching, cache policy, capacity, "
        f"prefetch): **{sb['outputs_identical']}**.\n",
        "Every run's cache decisions are in `logs/`; `cache.replay_check(cache.read_log(p))` "
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
    caps = sorted({r["capacity"] for r in real if r["policy"] != "all"})
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
    fit = sb["cpu_fit"]
    md += [
        "### Cost model calibration on this CPU\n",
        f"Non-negative least squares over {fit['steps']} measured steps: per-step host cost "
        f"{1e3 * fit['step_s']:.1f} ms, per-call overhead {1e3 * fit['launch_s']:.1f} ms, "
        f"effective bandwidth {fit['bandwidth_Bps'] / 1e9:.2f} "
        f"GB/s, compute {fit['flops'] / 1e9:.1f} GFLOP/s, load rate {fit['link_Bps'] / 1e9:.2f} "
        f"GB/s; R² = {fit['r2']:.3f}. The reference run: predicted "
        f"{fit['reference_predicted_s']:.1f} s, measured {fit['reference_measured_s']:.1f} s.\n",
        "### Simulated accelerators\n",
        "Same engine and requests (replayed tokens and experts), step times from the cost "
        "model in `readme_jax/serve/costmodel.py`; arrivals rescaled by each profile's speed-up "
        "over the measured CPU so the load is comparable.\n",
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
    return "\n".join(x for x in md if x)


def write_outputs(results: dict, out_dir: Path) -> dict:
    from readme_jax.eval.report import write_report

    paths = write_report(results, out_dir)
    with open(paths["report"], "a") as f:
        f.write(extra_markdown(results))
    return paths
