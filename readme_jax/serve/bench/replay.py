"""Offline cache runs and cache logs: replay a known per-step expert sequence through a fresh
`ExpertCache` (`run_cache`, `simulate`), write and read decision logs (JSONL), and re-derive a
log's counters independently of the policy (`replay_check`).

The runtime (`serve/cache.py`) makes the decisions and appends them to `cache.log`; this lab
module only reads what it wrote. Dimension letters: E experts, C cache slots.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from readme_jax.errors import UserError
from readme_jax.serve.cache import EMPTY, CacheStats, ExpertCache, Future, Policy, split_waves


def run_cache(
    policy: Policy,
    requests: Sequence[Sequence[int]],
    capacity: int,
    *,
    num_experts: int | None = None,
    bytes_per_expert: int = 0,
    prefetch: bool = False,
) -> ExpertCache:
    """Replay per-step expert lists through a fresh cache with the full future known."""
    if num_experts is None:
        num_experts = 1 + max((int(e) for step in requests for e in step), default=0)
    cache = ExpertCache(capacity, num_experts, policy, bytes_per_expert=bytes_per_expert)
    waves = [split_waves(step, capacity) for step in requests]
    flat = [e for step in waves for w in step for e in w]
    future, pos = Future(flat), 0
    for t, step in enumerate(waves):
        for w, wave in enumerate(step):
            pos += len(wave)
            cache.access(wave, future.at(pos), step=t, wave_index=w)
        if prefetch and t + 1 < len(waves) and step:
            nxt = [e for w in waves[t + 1] for e in w]
            cache.prefetch(step[-1], nxt, future.at(pos + len(nxt)), step=t)
    return cache


def simulate(policy: Policy, requests, capacity: int, **kwargs) -> CacheStats:
    """Counters of `run_cache` (see there)."""
    return run_cache(policy, requests, capacity, **kwargs).stats


# ----------------------------------------------------------------------------- logs


def write_log(path: str | Path, log: Iterable[dict]) -> None:
    with open(path, "w") as f:
        for rec in log:
            f.write(json.dumps(rec) + "\n")


def read_log(path: str | Path) -> list[dict]:
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{n}: not a JSON cache-log record: {err}") from None
    return out


def requests_from_log(log: Sequence[dict]) -> list[list[int]]:
    """The per-step expert sequence a log served (to re-simulate it under another policy)."""
    steps: dict[int, list[int]] = {}
    for rec in log:
        if rec["kind"] == "access":
            steps.setdefault(rec["step"], []).append(rec["expert"])
    return [steps[t] for t in sorted(steps)]


class ReplayError(UserError, ValueError):
    """A cache log that contradicts itself (a claimed hit that was not resident, ...)."""


def replay_check(log: Sequence[dict]) -> CacheStats:
    """Re-derive the counters of a cache log from residency alone, checking every decision.

    Checks: each hit was resident in its slot; each miss was not; loads go into a free slot or
    the slot of the named evicted expert; no expert of the current wave is evicted; capacity.
    """
    if not log or log[0].get("kind") != "header":
        raise ReplayError("cache log must start with a header record")
    cap, nbytes = log[0]["capacity"], log[0].get("bytes_per_expert", 0)
    waves: dict[tuple[int, int], set[int]] = {}
    for rec in log:
        if rec["kind"] == "access":
            waves.setdefault((rec["step"], rec["wave"]), set()).add(rec["expert"])
    slots, pending, stats = [EMPTY] * cap, set(), CacheStats()

    def load(n, e, slot, evicted, pinned=()):
        if not 0 <= slot < cap:
            raise ReplayError(f"record {n}: slot {slot} outside capacity {cap}")
        if e in slots:
            raise ReplayError(f"record {n}: expert {e} loaded while resident")
        if slots[slot] != (EMPTY if evicted is None else evicted):
            raise ReplayError(f"record {n}: slot {slot} holds {slots[slot]}, log says {evicted}")
        if evicted is not None:
            if evicted in pinned:
                raise ReplayError(f"record {n}: evicted {evicted}, needed by the same wave")
            stats.evictions += 1
            if evicted in pending:
                pending.discard(evicted)
                stats.wasted_prefetches += 1
        slots[slot] = e
        stats.loads += 1
        stats.bytes_moved += nbytes

    for n, rec in enumerate(log[1:], 1):
        kind, e = rec["kind"], rec.get("expert")
        if kind in ("preload", "prefetch"):
            load(n, e, rec["slot"], rec.get("evicted"))
            if kind == "prefetch":
                pending.add(e)
        elif kind == "access":
            stats.accesses += 1
            was_pending, resident = e in pending, e in slots
            hit = resident and not was_pending
            if hit != rec["hit"] or was_pending != rec.get("prefetched", False):
                raise ReplayError(f"record {n}: logged hit={rec['hit']} but replay says {hit}")
            if resident:
                if slots[rec["slot"]] != e:
                    raise ReplayError(f"record {n}: expert {e} is not in slot {rec['slot']}")
                pending.discard(e)
            else:
                pinned = waves[(rec["step"], rec["wave"])]
                load(n, e, rec["slot"], rec.get("evicted"), pinned)
            stats.hits += hit
            stats.misses += not hit
            stats.prefetched += was_pending
        else:
            raise ReplayError(f"record {n}: unknown kind {kind!r}")
    return stats
