"""Expert cache policies over a known future of expert requests (pre-gating).

Dimension letters: E experts, C cache slots.

Step model
----------
A *step* is one forward pass; it needs the experts of its tokens (a list with duplicates).
Duplicates are dropped, first occurrence kept, and the step is cut into *waves* of at most C
distinct experts (`split_waves`): the engine computes the MoE layers of a step wave by wave
when the step needs more experts than there are slots. Every expert of the wave being served is
*pinned*: no expert of the current wave is ever evicted to make room for another expert of the
same wave. Experts of earlier waves of the same step may be evicted (their tokens are done).
Within a wave, experts are accessed in order; the *access sequence* of a trace is the
concatenation of all waves, and "distance to next use" is counted in accesses of that sequence.

Counters: an access is a *hit* if its expert was resident before the access (and not brought
in by a prefetch that this access is the first use of); otherwise it is a *miss*, and the miss
is *prefetched* when a prefetch already issued its load. `loads` counts every host->device copy
(demand, prefetch, preload), `bytes_moved = loads * bytes_per_expert`.

Engine protocol, per step t with experts X_t and next step X_{t+1}:

    waves = split_waves(X_t, C)
    for w, wave in enumerate(waves):
        later = [e for v in waves[w + 1:] for e in v] + known_future   # accesses after `wave`
        for d in cache.access(wave, later, step=t, wave_index=w):
            if d.needs_load: store.load(d.expert, d.slot)       # on-demand load
        ... dispatch compute for wave with slots [cache.slot_of(e) for e in wave] ...
    for ld in cache.prefetch(last_wave, X_{t+1}, future_after, step=t):
        store.load(ld.expert, ld.slot)                          # overlaps the compute
    ... block on the compute ...

Prefetch pays when X_{t+1} is known before step t is awaited: queued prompts' experts are
known at arrival, but a decode token's expert only once step t has sampled it. For decode, the
overlap on offer is within a step: issue the step's loads first, layer by layer (the store's
`layer_axis`), and dispatch the layers after them.

Every decision is appended to `cache.log` (JSON-able dicts); the lab's
`serve/bench/replay.py:replay_check(log)` re-derives the counters from the logged sequence
independently of the policy, and its `run_cache`/`simulate` replay a known expert sequence
through a fresh cache.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Iterable, Sequence

import numpy as np

EMPTY = -1


def dedup(experts: Iterable[int]) -> list[int]:
    """Distinct experts in first-occurrence order."""
    return list(dict.fromkeys(int(e) for e in experts))


def split_waves(experts: Iterable[int], capacity: int) -> list[list[int]]:
    """Cut a step's experts into waves of at most `capacity` distinct experts."""
    uniq = dedup(experts)
    return [uniq[i : i + capacity] for i in range(0, len(uniq), capacity)]


def flatten(requests: Iterable[Iterable[int]], capacity: int) -> list[int]:
    """The access sequence of per-step expert lists: every step's waves, concatenated."""
    return [e for step in requests for wave in split_waves(step, capacity) for e in wave]


# ----------------------------------------------------------------------------- future


class Future:
    """A known sequence of future expert accesses with O(log n) next-use lookups.

    `at(start)` returns a view sharing the index, so a simulator can walk a long trace cheaply.
    """

    def __init__(self, seq: Sequence[int], start: int = 0, _index=None):
        self.seq = seq
        self.start = start
        if _index is None:
            _index = {}
            for i, e in enumerate(seq):
                _index.setdefault(int(e), []).append(i)
        self._index = _index

    def at(self, start: int) -> Future:
        return Future(self.seq, start, self._index)

    def next_use(self, expert: int) -> float:
        """Accesses from `start` until `expert` is next needed (0 = first); inf if never."""
        pos = self._index.get(expert)
        if not pos:
            return math.inf
        i = bisect.bisect_left(pos, self.start)
        return pos[i] - self.start if i < len(pos) else math.inf

    def prepend(self, prefix: Sequence[int]) -> _Prefixed:
        return _Prefixed(prefix, self)

    @staticmethod
    def of(future: Future | _Prefixed | Sequence[int] | None) -> Future | _Prefixed:
        if future is None:
            return Future(())
        if isinstance(future, Future | _Prefixed):
            return future
        return Future([int(e) for e in future])


class _Prefixed:
    """`prefix` followed by another future, without re-indexing the tail."""

    def __init__(self, prefix: Sequence[int], rest: Future | _Prefixed):
        self.prefix = [int(e) for e in prefix]
        self.first = {}
        for i, e in enumerate(self.prefix):
            self.first.setdefault(e, i)
        self.rest = rest

    def next_use(self, expert: int) -> float:
        if expert in self.first:
            return self.first[expert]
        return len(self.prefix) + self.rest.next_use(expert)

    def prepend(self, prefix: Sequence[int]) -> _Prefixed:
        return _Prefixed(prefix, self)


# ----------------------------------------------------------------------------- policies


class Policy:
    """Chooses the victim among evictable resident experts; the cache does the bookkeeping."""

    name = "base"
    preload = False  # fill the cache with experts 0..C-1 before the first access

    def victim(self, candidates: list[int], cache: ExpertCache, future) -> int:
        raise NotImplementedError


@dataclasses.dataclass
class Belady(Policy):
    """Evict the expert needed farthest in the future (never-again first); ties: LRU.

    `window`: only the next `window` accesses are visible; beyond counts as never.
    """

    window: int | None = None
    name = "belady"

    def distance(self, expert: int, future) -> float:
        d = future.next_use(expert)
        return math.inf if self.window is not None and d >= self.window else d

    def victim(self, candidates, cache, future):
        return max(
            candidates,
            key=lambda e: (self.distance(e, future), -cache.last_use[e], -cache.slot_of(e)),
        )


class LRU(Policy):
    name = "lru"

    def victim(self, candidates, cache, future):
        return min(candidates, key=lambda e: (cache.last_use[e], cache.slot_of(e)))


@dataclasses.dataclass
class LFU(Policy):
    """Evict the least frequently used expert; ties: least recently used.

    Counts are in-cache (reset when an expert is loaded) unless `persistent`.
    """

    persistent: bool = False
    name = "lfu"

    def victim(self, candidates, cache, future):
        return min(candidates, key=lambda e: (cache.count[e], cache.last_use[e], cache.slot_of(e)))


class Random(Policy):
    name = "random"

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.rng = np.random.default_rng(seed)

    def victim(self, candidates, cache, future):
        cands = sorted(candidates)
        return cands[int(self.rng.integers(len(cands)))]


@dataclasses.dataclass
class AllResident(Policy):
    """No offload: C >= E, every expert resident (preloaded, or loaded once on first use)."""

    preload: bool = True
    name = "all"

    def victim(self, candidates, cache, future):
        raise RuntimeError("all-resident cache asked to evict; capacity must be >= num_experts")


@dataclasses.dataclass
class OnlineBelady(Belady):
    """Belady's rule over only what the engine knows at each step: queued prompts' experts and
    the current step (a decoding request's next expert is known one step ahead). The rule is
    Belady's; the caller passes the known future (`serve.cachesim.KnownFuture`). Given the
    whole future it is Belady."""

    name = "online_belady"


POLICIES = {
    "belady": Belady,
    "online_belady": OnlineBelady,
    "lru": LRU,
    "lfu": LFU,
    "random": Random,
    "all": AllResident,
}


def make_policy(name: str, **kwargs) -> Policy:
    """Policy by name: belady (window=), online_belady, lru, lfu (persistent=), random (seed=),
    all (preload=)."""
    if name not in POLICIES:
        raise ValueError(f"unknown cache policy {name!r}; choose one of {sorted(POLICIES)}")
    return POLICIES[name](**kwargs)


# ----------------------------------------------------------------------------- the cache


@dataclasses.dataclass
class CacheStats:
    accesses: int = 0
    hits: int = 0
    misses: int = 0
    prefetched: int = 0  # misses whose load a prefetch had already issued
    evictions: int = 0
    loads: int = 0  # every host->device copy: demand, prefetch, preload
    wasted_prefetches: int = 0  # prefetched experts evicted before their use
    bytes_moved: int = 0
    load_time_s: float = 0.0  # filled from the store when loads are real

    @property
    def hit_ratio(self) -> float:
        return self.hits / self.accesses if self.accesses else 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"hit_ratio": self.hit_ratio}


@dataclasses.dataclass(frozen=True)
class Decision:
    """One access: where `expert` lives after it, and what (if anything) it evicted."""

    step: int
    wave: int
    expert: int
    hit: bool
    slot: int
    evicted: int | None = None
    prefetched: bool = False

    @property
    def needs_load(self) -> bool:
        """The engine must copy this expert into `slot` now (on-demand load)."""
        return not self.hit and not self.prefetched

    def record(self) -> dict:
        return {"kind": "access", **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True)
class Load:
    """A planned prefetch: copy `expert` into `slot`, evicting `evicted` (None: free slot)."""

    expert: int
    slot: int
    evicted: int | None = None


class ExpertCache:
    """C device slots over E experts, driven by a `Policy`. Host-side state only."""

    def __init__(
        self,
        capacity: int,
        num_experts: int,
        policy: Policy,
        *,
        bytes_per_expert: int = 0,
    ):
        if capacity < 1:
            raise ValueError(f"cache capacity must be >= 1, got {capacity}")
        if isinstance(policy, AllResident) and capacity < num_experts:
            raise ValueError(
                f"all-resident cache needs capacity >= num_experts ({num_experts}), got {capacity}"
            )
        self.capacity, self.num_experts, self.policy = capacity, num_experts, policy
        self.bytes_per_expert = bytes_per_expert
        self.slots = [EMPTY] * capacity  # [C] expert per slot
        self._slot: dict[int, int] = {}
        self.last_use: dict[int, int] = {}
        self.count: dict[int, int] = {}
        self.clock = 0
        self.pending: set[int] = set()  # prefetched, not yet accessed
        self.stats = CacheStats()
        self.log: list[dict] = [
            {
                "kind": "header",
                "capacity": capacity,
                "num_experts": num_experts,
                "policy": policy.name,
                "bytes_per_expert": bytes_per_expert,
            }
        ]
        if policy.preload:
            for e in range(min(capacity, num_experts)):
                self._place(e, e, None)
                self.log.append({"kind": "preload", "step": -1, "expert": e, "slot": e})

    def slot_of(self, expert: int) -> int | None:
        return self._slot.get(expert)

    @property
    def resident(self) -> frozenset[int]:
        return frozenset(self._slot)

    def _place(self, expert: int, slot: int, evicted: int | None) -> None:
        if evicted is not None:
            del self._slot[evicted]
            self.stats.evictions += 1
            if evicted in self.pending:
                self.pending.discard(evicted)
                self.stats.wasted_prefetches += 1
            if not getattr(self.policy, "persistent", False):
                self.count.pop(evicted, None)
        self.slots[slot] = expert
        self._slot[expert] = slot
        self.last_use[expert] = self.clock
        self.count.setdefault(expert, 0)
        self.stats.loads += 1
        self.stats.bytes_moved += self.bytes_per_expert

    def _choose_slot(self, expert, pinned, future, before=None) -> tuple[int, int | None] | None:
        """Free slot, else a policy victim outside `pinned` (and used after `before`)."""
        if EMPTY in self.slots:
            return self.slots.index(EMPTY), None
        cands = [e for e in self.slots if e not in pinned]
        if before is not None:
            cands = [e for e in cands if future.next_use(e) > before]
        if not cands:
            return None
        victim = self.policy.victim(cands, self, future)
        return self._slot[victim], victim

    def _check(self, expert: int) -> int:
        expert = int(expert)
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert id {expert} out of range [0, {self.num_experts})")
        return expert

    def access(self, wave: Iterable[int], future=None, *, step: int = 0, wave_index: int = 0):
        """Serve one wave (<= C distinct experts); `future`: accesses after this wave."""
        wave = [self._check(e) for e in dedup(wave)]
        if len(wave) > self.capacity:
            raise ValueError(
                f"a wave needs {len(wave)} experts but the cache has {self.capacity} slots; "
                "cut the step with split_waves or call run_step"
            )
        future, pinned, out = Future.of(future), set(wave), []
        for e in wave:
            self.clock += 1
            self.stats.accesses += 1
            if e in self.pending:
                self.pending.discard(e)
                d = Decision(step, wave_index, e, False, self._slot[e], None, True)
                self.stats.misses += 1
                self.stats.prefetched += 1
            elif e in self._slot:
                d = Decision(step, wave_index, e, True, self._slot[e])
                self.stats.hits += 1
            else:
                slot, evicted = self._choose_slot(e, pinned, future)
                self._place(e, slot, evicted)
                d = Decision(step, wave_index, e, False, slot, evicted)
                self.stats.misses += 1
            self.last_use[e] = self.clock
            self.count[e] = self.count.get(e, 0) + 1
            self.log.append(d.record())
            out.append(d)
        return out

    def run_step(self, experts: Iterable[int], future=None, *, step: int = 0) -> list[Decision]:
        """Serve a whole step wave by wave; `future`: accesses after this step.

        Decisions of later waves may evict earlier waves' experts: an engine that loads must
        dispatch each wave's compute before the next wave's loads (use `access` per wave).
        """
        waves, future, out = split_waves(experts, self.capacity), Future.of(future), []
        for w, wave in enumerate(waves):
            later = [e for nxt in waves[w + 1 :] for e in nxt]
            out += self.access(wave, future.prepend(later), step=step, wave_index=w)
        return out

    def apply_prefetch(self, plan: Iterable[Load], *, step: int = 0) -> list[Load]:
        """Commit a plan from `plan_prefetch`: the experts become resident and pending."""
        plan = list(plan)
        for ld in plan:
            held = self.slots[ld.slot]
            if held != (EMPTY if ld.evicted is None else ld.evicted) or ld.expert in self._slot:
                raise ValueError(f"stale prefetch plan {ld}: slot {ld.slot} holds {held}")
            self._place(ld.expert, ld.slot, ld.evicted)
            self.pending.add(ld.expert)
            self.log.append({"kind": "prefetch", "step": step, **dataclasses.asdict(ld)})
        return plan

    def prefetch(self, current, next_experts, future=None, *, step: int = 0) -> list[Load]:
        """`plan_prefetch` then `apply_prefetch`; returns the loads the store must issue."""
        plan = plan_prefetch(self, current, next_experts, future)
        return self.apply_prefetch(plan, step=step)


def plan_prefetch(cache: ExpertCache, current, next_experts, future=None) -> list[Load]:
    """Plan loads for the misses of the next step's first wave; does not change `cache`.

    `current`: experts the in-flight compute uses (never evicted). `future`: accesses after the
    next step. A victim must be needed strictly after the expert fetched in its place (so a
    prefetch never causes an earlier miss); a miss with no such victim is left to on-demand.
    """
    waves = split_waves(next_experts, cache.capacity)
    if not waves:
        return []
    first = [cache._check(e) for e in waves[0]]
    fut = Future.of(future).prepend([e for w in waves for e in w])
    pinned = set(dedup(current)) | set(first)
    saved = list(cache.slots), dict(cache._slot)
    plan = []
    try:  # plan on the live state, then restore it
        for e in first:
            if e in cache._slot:
                continue
            choice = cache._choose_slot(e, pinned, fut, before=fut.next_use(e))
            if choice is None:
                continue
            slot, evicted = choice
            if evicted is not None:
                del cache._slot[evicted]
            cache.slots[slot], cache._slot[e] = e, slot
            plan.append(Load(e, slot, evicted))
    finally:
        cache.slots, cache._slot = saved
    return plan
