"""Serving benchmark runs: a trace replayed under every batching x cache policy x capacity, on
the real engine (measured wall time) and on a simulated accelerator (cost model). Used by
`launch/serve_bench.py`; the results and report are assembled in `serve/bench/report.py`.

Per run, out_dir/logs/<run>.cache.jsonl (the cache decision log:
`replay.replay_check(replay.read_log(path))` re-derives its counters) and logs/<run>.steps.jsonl
(per step: the batch, the experts it needed, its calls with their waves of experts, hits and
loads, prefetches, time).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from readme_jax.serve.backend import ModelBackend, ReplayBackend
from readme_jax.serve.bench import costmodel as cm
from readme_jax.serve.bench.replay import replay_check, run_cache, write_log
from readme_jax.serve.bench.trace import TraceRequest
from readme_jax.serve.cache import Belady
from readme_jax.serve.engine import Engine, EngineConfig, RunResult, ServeRequest


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    engine: EngineConfig = EngineConfig(num_slots=8, max_len=128, max_batch_tokens=32)
    batching: tuple[str, ...] = ("expert", "cache", "decode", "prefill")
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
