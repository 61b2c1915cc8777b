"""Online vs hindsight expert caching, and a model-free serving simulation on routed traces.

Dimension letters: E experts, C cache slots.

What the engine knows. With a pre-gating router, a queued prompt's experts are known when it
arrives (the router runs on the prompt), but a decoding request's next expert only once the
previous step has sampled its token: one step ahead. `KnownFuture` is that knowledge at a step
t: every access of step t itself, plus the accesses of later steps that belong to prefills of
requests that have arrived by step t, at their positions in the access sequence. "online
Belady" (`cache.OnlineBelady`) evicts by Belady's rule over this known future; hindsight Belady
sees the whole sequence. The engine itself guesses a little more (decoding requests keep their
expert, `executor.known_future`); the online policy here takes no guess.

The simulation (`simulate`) replaces the model with routed traces: each request carries its
prompt's experts and the experts of the tokens it will generate (from the router run over real
held-out text, `route_documents`), arrives at a time in seconds, and is served by the
`batching.schedule` policies, one batch per step, on a `bench.costmodel.CostClock` (e.g. the A100
profile at Llama-2-7B scale). A step is a decode call over all decoding rows, then one prefill
call per admitted prompt (whole, no chunking), each cut into waves of C experts.
Normalized latency = (finish - arrival) / generated tokens, in seconds per token (paper §5).
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Sequence

import numpy as np

import readme_jax.serve.batching as batching
import readme_jax.serve.bench.costmodel as cm
from readme_jax.serve.bench.replay import run_cache
from readme_jax.serve.cache import ExpertCache, Future, make_policy, split_waves


# ----------------------------------------------------------------------------- knowledge
@dataclasses.dataclass(frozen=True)
class Access:
    """One cache access of a trace: `expert`, in `step`, known from step `known_from` on."""

    expert: int
    step: int
    known_from: int


class KnownFuture(Future):
    """The accesses at positions >= `start` that are known at step `step` (see module doc).

    `next_use(e)` is the distance in accesses of the full sequence to e's next *known* use
    (inf when none is known), so Belady ranks by when the engine expects to need an expert.
    """

    def __init__(self, trace: Sequence[Access], start: int = 0, step: int = 0, _index=None):
        self.trace, self.seq, self.start, self.step = trace, trace, start, step
        if _index is None:
            _index = {}
            for i, a in enumerate(trace):
                _index.setdefault(a.expert, []).append(i)
        self._index = _index

    def at(self, start: int, step: int) -> KnownFuture:
        return KnownFuture(self.trace, start, step, self._index)

    def next_use(self, expert: int) -> float:
        pos = self._index.get(expert, ())
        for i in range(bisect.bisect_left(pos, self.start), len(pos)):
            if self.trace[pos[i]].known_from <= self.step:
                return pos[i] - self.start
        return math.inf


def trace_steps(trace: Sequence[Access]) -> list[list[int]]:
    """Per-step expert lists of an access trace (the input of `cache.run_cache`)."""
    steps: list[list[int]] = [[] for _ in range(1 + max((a.step for a in trace), default=-1))]
    for a in trace:
        steps[a.step].append(a.expert)
    return steps


def run_online(policy_name: str, trace: Sequence[Access], capacity: int, num_experts: int):
    """Replay a trace with the future the engine knows at each step; returns the ExpertCache.

    `trace` must come from `wave_trace(trace, capacity)`: per step, distinct experts in the
    order of their waves of `capacity`.
    """
    cache = ExpertCache(capacity, num_experts, make_policy(policy_name, **_kw(policy_name)))
    fut = KnownFuture(trace)
    i, wave = 0, 0
    while i < len(trace):
        step = trace[i].step
        j = i
        while j < len(trace) and trace[j].step == step:
            j += 1
        for k in range(i, j, capacity):
            w = trace[k : min(k + capacity, j)]
            pos = i + len(w)
            cache.access([a.expert for a in w], fut.at(pos, step), step=step, wave_index=wave)
            i, wave = pos, wave + 1
        wave = 0
    return cache


def _kw(name: str) -> dict:
    return {"seed": 0} if name == "random" else {}


def hit_ratios(trace: Sequence[Access], policies: Sequence[str], capacities, num_experts: int):
    """{policy: {C: hit ratio}} on one trace; every policy but online_belady sees the whole
    future (only Belady uses it), online_belady what the engine knows (`KnownFuture`)."""
    out: dict[str, dict[int, float]] = {}
    for C in capacities:
        waved = wave_trace(trace, C)
        for p in policies:
            if p == "online_belady":
                stats = run_online(p, waved, C, num_experts).stats
            else:
                steps = trace_steps(waved)
                stats = run_cache(make_policy(p, **_kw(p)), steps, C, num_experts=num_experts).stats
            out.setdefault(p, {})[C] = stats.hit_ratio
    return out


def wave_trace(trace: Sequence[Access], capacity: int) -> list[Access]:
    """Per step: distinct experts in first-occurrence order (earliest known_from kept), as
    `cache.split_waves` orders them; the access sequence both replays walk."""
    out: list[Access] = []
    i = 0
    while i < len(trace):
        step, first = trace[i].step, {}
        while i < len(trace) and trace[i].step == step:
            a = trace[i]
            old = first.get(a.expert)
            first[a.expert] = a if old is None or a.known_from < old.known_from else old
            i += 1
        order = [e for w in split_waves(list(first), capacity) for e in w]
        out += [first[e] for e in order]
    return out


# ----------------------------------------------------------------------------- simulation
@dataclasses.dataclass(frozen=True)
class RoutedRequest:
    """A request of a routed trace. `output_experts`: the experts of the generated tokens that
    are fed back (decode steps); the request generates len(output_experts) + 1 tokens."""

    id: int
    arrival_s: float
    prompt_experts: tuple[int, ...]
    output_experts: tuple[int, ...]

    @property
    def max_new_tokens(self) -> int:
        return len(self.output_experts) + 1


@dataclasses.dataclass(frozen=True)
class SimConfig:
    batching: str = "decode"  # batching.POLICIES
    policy: str = "online_belady"  # cache policy the engine runs (online: it cannot see ahead)
    capacity: int = 4
    num_experts: int = 8
    max_batch_tokens: int = 256
    num_slots: int = 8
    max_wait: int | None = 32
    max_experts: int | None = None  # expert cap of expert-aware batching (serve.batching)


def simulate(requests: Sequence[RoutedRequest], cfg: SimConfig, clock: cm.CostClock) -> dict:
    """Serves a routed trace with one batching policy and one cache policy; returns latencies,
    unique experts per batch, the access trace (for `hit_ratios`) and the cache log.

    The cache runs online: at each access it sees `KnownFuture` (this step, queued prompts).
    Raises:
      ValueError: an expert id outside [0, num_experts), or an empty request list.
    """
    if not requests:
        raise ValueError("simulate needs at least one request")
    reqs = {r.id: r for r in requests}
    pending = sorted(requests, key=lambda r: (r.arrival_s, r.id))
    cache = ExpertCache(cfg.capacity, cfg.num_experts, make_policy(cfg.policy, **_kw(cfg.policy)))
    live: dict[int, batching.Request] = {}
    arrived_step: dict[int, int] = {}
    now, step, trace, steps, finish, uniq = 0.0, 0, [], [], {}, []
    while pending or live:
        while pending and pending[0].arrival_s <= now:
            r = pending.pop(0)
            live[r.id] = batching.Request(
                r.id,
                len(r.prompt_experts),
                r.max_new_tokens,
                arrival_step=step,
                prompt_experts=r.prompt_experts,
            )
            arrived_step[r.id] = step
        if not live:
            now = pending[0].arrival_s
            continue
        batch = batching.schedule(
            cfg.batching,
            list(live.values()),
            cfg.max_batch_tokens,
            step=step,
            max_wait=cfg.max_wait,
            num_slots=cfg.num_slots,
            resident=cache.resident,
            max_experts=cfg.max_experts,
        )
        batching.age(list(live.values()), batch)
        rec = _run_step(cache, batch, live, reqs, arrived_step, step, cfg.capacity)
        trace += rec["accesses"]
        now += clock.duration(rec, 0.0, now)
        uniq.append(len(batch.experts))
        steps.append({k: v for k, v in rec.items() if k != "accesses"} | {"end_s": now})
        for i in batch.ids:
            r = live[i]
            r.state, r.generated = batching.DECODING, r.generated + 1
            if r.generated >= r.max_new_tokens:
                finish[i] = now
                del live[i]
            else:
                r.next_expert = int(reqs[i].output_experts[r.generated - 1])
        step += 1
    lat = [(finish[r.id] - r.arrival_s) / r.max_new_tokens for r in requests]
    tokens = sum(r.max_new_tokens for r in requests)
    return {
        "config": dataclasses.asdict(cfg),
        "steps": len(steps),
        "mean_unique_experts": float(np.mean(uniq)),
        "mean_norm_latency_s": float(np.mean(lat)),
        "p95_norm_latency_s": float(np.percentile(lat, 95)),
        "throughput_tok_s": tokens / now,
        "makespan_s": now,
        "cache": cache.stats.to_dict(),
        "latencies": lat,
        "trace": trace,
        "cache_log": cache.log,
    }


def _run_step(cache, batch, live, reqs, arrived_step, step, C) -> dict:
    """The step's calls through the cache with the online known future; the step record."""
    calls, records, accesses = [], [], []
    if batch.decode:
        experts = [live[i].next_expert for i in batch.decode]
        ctx = sum(live[i].prompt_len + live[i].generated for i in batch.decode)
        calls.append(("decode", [Access(e, step, step) for e in experts], len(experts), ctx))
    for i in batch.prefill:
        acc = [Access(int(e), step, arrived_step[i]) for e in reqs[i].prompt_experts]
        calls.append(("prefill", acc, len(acc), live[i].prompt_len))
    queued = sorted(
        (r for r in live.values() if r.state == batching.WAITING and r.id not in batch.prefill),
        key=lambda r: (r.arrival_step, r.id),
    )
    later = [Access(int(e), step + 1, step) for r in queued for e in r.prompt_experts]
    step_acc = wave_trace([a for _, acc, _, _ in calls for a in acc], C)
    fut, pos, wave = KnownFuture(step_acc + later), 0, 0
    by_call = []
    for kind, acc, toks, ctx in calls:
        need = set(a.expert for a in acc)
        by_call.append(
            {
                "kind": kind,
                "experts": sorted(need),
                "tokens": toks,
                "context": ctx,
                "loads": 0,
                "hits": 0,
            }
        )
    for k in range(0, len(step_acc), C):
        w = step_acc[k : k + C]
        pos += len(w)
        for d in cache.access([a.expert for a in w], fut.at(pos, step), step=step, wave_index=wave):
            rec = next(r for r in by_call if d.expert in r["experts"])
            rec["loads"] += d.needs_load
            rec["hits"] += d.hit
        wave += 1
    records += by_call
    accesses += step_acc
    return {
        "step": step,
        "prefill": list(batch.prefill),
        "decode": list(batch.decode),
        "batch_experts": list(batch.experts),
        "calls": records,
        "prefetch": [],
        "accesses": accesses,
    }


# ----------------------------------------------------------------------------- routed traces
OUTPUT_LENGTHS = {  # generated tokens per request: lognormal median/sigma clipped to [lo, hi]
    "default": dict(median=10, sigma=0.8, lo=1, hi=64),
    "decode_heavy": dict(median=40, sigma=0.5, lo=8, hi=80),
}


def routed_requests(
    route_fn,
    streams: dict[str, tuple[np.ndarray, np.ndarray]],
    n: int,
    rate: float,
    prompt_len: tuple[int, int],
    outputs: str,
    rng: np.random.Generator,
) -> list[RoutedRequest]:
    """Requests over real documents: domain uniform, a document with room for the window (else
    the longest), a random offset; the first `prompt_len` (uniform [lo, hi]) tokens are the
    prompt and the continuation stands in for the generated tokens (teacher-forced).

    Args:
      route_fn: tokens [S] (int32) -> expert per token [S]; a causal router, so the experts of
        the continuation are those the engine would see had the model produced that text.
      streams: domain -> (token stream [T], document offsets [N+1]).
      outputs: a key of `OUTPUT_LENGTHS`. rate: Poisson arrivals per second.
    """
    spec = OUTPUT_LENGTHS[outputs]
    outs = np.clip(
        np.round(spec["median"] * np.exp(spec["sigma"] * rng.standard_normal(n))),
        spec["lo"],
        spec["hi"],
    ).astype(int)
    arrivals = np.concatenate([[0.0], np.cumsum(rng.exponential(1.0 / rate, n)[1:])])
    names, reqs = list(streams), []
    for i in range(n):
        toks, offs = streams[names[int(rng.integers(len(names)))]]
        P, m = int(rng.integers(prompt_len[0], prompt_len[1] + 1)), int(outs[i])
        lens = np.diff(offs)
        ok = np.flatnonzero(lens >= P + m)
        d = int(ok[int(rng.integers(len(ok)))]) if len(ok) else int(np.argmax(lens))
        a = int(offs[d]) + int(rng.integers(0, max(1, lens[d] - P - m + 1)))
        e = np.asarray(route_fn(np.asarray(toks[a : a + P + m - 1], np.int32)))
        reqs.append(
            RoutedRequest(i, float(arrivals[i]), tuple(map(int, e[:P])), tuple(map(int, e[P:])))
        )
    return reqs
