"""Expert cache policies: optimality, capacity, textbook results, prefetch safety, replay."""

import functools
import math

import numpy as np
import pytest

from readme_jax.serve.bench.replay import (
    ReplayError,
    read_log,
    replay_check,
    requests_from_log,
    run_cache,
    simulate,
    write_log,
)
from readme_jax.serve.cache import (
    LFU,
    LRU,
    AllResident,
    Belady,
    ExpertCache,
    Future,
    Random,
    make_policy,
    plan_prefetch,
    split_waves,
)


def optimal_hits(requests, capacity):
    """Max hits over every eviction choice (demand loading, current wave pinned)."""
    accesses = []  # (expert, pinned wave)
    for step in requests:
        for wave in split_waves(step, capacity):
            accesses += [(e, frozenset(wave)) for e in wave]

    @functools.cache
    def best(i, resident):
        if i == len(accesses):
            return 0
        e, pinned = accesses[i]
        if e in resident:
            return 1 + best(i + 1, resident)
        if len(resident) < capacity:
            return best(i + 1, resident | {e})
        return max(best(i + 1, (resident - {v}) | {e}) for v in resident - pinned)

    return best(0, frozenset())


def random_requests(rng, num_experts, length, max_per_step=1):
    return [
        list(rng.integers(num_experts, size=int(rng.integers(1, max_per_step + 1))))
        for _ in range(length)
    ]


@pytest.mark.parametrize("max_per_step", [1, 3])
def test_belady_matches_brute_force_optimum(max_per_step):
    rng = np.random.default_rng(0)
    for _ in range(150):
        E, C = int(rng.integers(2, 6)), int(rng.integers(1, 4))
        reqs = random_requests(rng, E, int(rng.integers(1, 13)), max_per_step)
        got = simulate(Belady(), reqs, C, num_experts=E).hits
        assert got == optimal_hits(reqs, C), (reqs, C)


def test_belady_never_below_other_policies():
    rng = np.random.default_rng(1)
    for seed in range(100):
        E, C = int(rng.integers(3, 8)), int(rng.integers(1, 5))
        reqs = random_requests(rng, E, 40, max_per_step=3)
        best = simulate(Belady(), reqs, C, num_experts=E).hits
        for pol in (LRU(), LFU(), LFU(persistent=True), Random(seed), Belady(window=3)):
            assert best >= simulate(pol, reqs, C, num_experts=E).hits, pol


@pytest.mark.parametrize("name", ["belady", "lru", "lfu", "random", "all"])
@pytest.mark.parametrize("prefetch", [False, True])
def test_every_policy_respects_capacity_and_pins_the_wave(name, prefetch):
    rng = np.random.default_rng(2)
    E = 6
    for C in (1, 2, 4) if name != "all" else (E,):
        reqs = random_requests(rng, E, 60, max_per_step=5)
        cache = run_cache(make_policy(name), reqs, C, num_experts=E, prefetch=prefetch)
        assert len(cache.resident) <= C and len(cache.slots) == C
        stats = replay_check(cache.log)  # checks slots, pinning and every hit claim
        assert stats == cache.stats
        assert stats.accesses == sum(len(set(map(int, s))) for s in reqs)


def test_lru_textbook_trace():
    # Silberschatz's reference string, 3 frames: LRU 12 faults, OPT 9 faults
    refs = [7, 0, 1, 2, 0, 3, 0, 4, 2, 3, 0, 3, 2, 1, 2, 0, 1, 7, 0, 1]
    reqs = [[e] for e in refs]
    stats = simulate(LRU(), reqs, 3)
    assert (stats.hits, stats.misses, stats.evictions) == (8, 12, 9)
    assert simulate(Belady(), reqs, 3).misses == 9


def test_lru_evicts_least_recent_lfu_least_frequent():
    reqs = [[0], [0], [0], [1], [2], [1], [3]]  # at [3]: LRU victim 0, LFU victim 2
    lru = run_cache(LRU(), reqs, 3)
    lfu = run_cache(LFU(), reqs, 3)
    assert lru.log[-1]["evicted"] == 0 and lfu.log[-1]["evicted"] == 2
    # LFU ties (0 and 1 both used once) go to the least recent
    tie = run_cache(LFU(), [[0], [1], [2]], 2)
    assert tie.log[-1]["evicted"] == 0


def test_belady_prefers_never_used_again_then_lru_ties():
    # cache {0,1,2}; at 3: 0 used next, 1 and 2 never again -> evict the LRU of them (1)
    cache = run_cache(Belady(), [[0], [1], [2], [0], [3], [0]], 3)
    assert [r["evicted"] for r in cache.log if r.get("evicted") is not None] == [1]


def test_belady_window_treats_far_uses_as_never():
    f = Future([5, 6, 7, 1])
    assert Belady(window=2).distance(1, f) == math.inf
    assert Belady().distance(1, f) == 3 and f.at(1).next_use(5) == math.inf


def test_all_resident_never_misses_after_preload_and_rejects_small_capacity():
    reqs = random_requests(np.random.default_rng(3), 5, 30, 3)
    assert simulate(AllResident(), reqs, 5, num_experts=5).misses == 0
    warm = simulate(AllResident(preload=False), reqs, 5, num_experts=5)
    assert warm.misses == len({int(e) for s in reqs for e in s}) and warm.evictions == 0
    with pytest.raises(ValueError, match="capacity"):
        ExpertCache(3, 5, AllResident())


def test_multi_expert_step_larger_than_capacity_runs_in_waves():
    cache = ExpertCache(2, 5, LRU())
    ds = cache.run_step([0, 1, 1, 2, 3, 4], step=0)
    assert [d.wave for d in ds] == [0, 0, 1, 1, 2]
    assert [d.expert for d in ds] == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="split_waves"):
        cache.access([0, 1, 2])
    with pytest.raises(ValueError, match="out of range"):
        cache.access([9])


def test_prefetch_never_evicts_current_or_earlier_needed():
    rng = np.random.default_rng(4)
    for trial in range(300):
        E, C = 7, int(rng.integers(2, 6))
        cache = ExpertCache(C, E, make_policy(["belady", "lru", "lfu", "random"][trial % 4]))
        for t, step in enumerate(random_requests(rng, E, 5, 3)):
            cache.run_step(step, step=t)
        current = list(rng.choice(E, size=int(rng.integers(1, C)), replace=False))
        cache.access(current, step=9)
        nxt = list(rng.integers(E, size=int(rng.integers(1, 4))))
        future = list(rng.integers(E, size=10))
        seq = Future([e for w in split_waves(nxt, C) for e in w] + future)
        before = set(cache.slots)
        plan = plan_prefetch(cache, current, nxt, future)
        assert set(cache.slots) == before  # planning does not mutate
        for ld in plan:
            assert ld.expert in split_waves(nxt, C)[0] and ld.expert not in before
            if ld.evicted is not None:
                assert ld.evicted not in current
                assert seq.next_use(ld.evicted) > seq.next_use(ld.expert)
        cache.apply_prefetch(plan, step=9)
        ds = cache.access(split_waves(nxt, C)[0], future, step=10)
        assert {d.expert for d in ds if d.prefetched} == {ld.expert for ld in plan}
        assert not any(d.needs_load and d.expert in {ld.expert for ld in plan} for d in ds)


def test_prefetch_hides_loads_without_losing_hits_for_belady():
    rng = np.random.default_rng(5)
    reqs = random_requests(rng, 7, 200, 2)
    plain = simulate(Belady(), reqs, 4, num_experts=7)
    pre = simulate(Belady(), reqs, 4, num_experts=7, prefetch=True)
    assert pre.prefetched > 0.5 * pre.misses
    assert pre.accesses == plain.accesses and pre.wasted_prefetches == 0


def test_log_round_trips_and_replay_rejects_a_forged_hit(tmp_path):
    reqs = random_requests(np.random.default_rng(6), 5, 50, 2)
    cache = run_cache(Belady(), reqs, 2, bytes_per_expert=10, prefetch=True)
    path = tmp_path / "log.jsonl"
    write_log(path, cache.log)
    log = read_log(path)
    stats = replay_check(log)
    assert stats.hits == cache.stats.hits and stats.bytes_moved == 10 * stats.loads
    assert requests_from_log(log) == [[e for w in split_waves(s, 2) for e in w] for s in reqs]
    miss = next(i for i, r in enumerate(log) if r["kind"] == "access" and not r["hit"])
    log[miss] = log[miss] | {"hit": True}
    with pytest.raises(ReplayError, match=f"record {miss}"):
        replay_check(log)
    (tmp_path / "bad.jsonl").write_text('{"kind": "header"}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_log(tmp_path / "bad.jsonl")


def test_random_policy_is_seeded_and_unknown_policy_is_named():
    reqs = random_requests(np.random.default_rng(7), 6, 80)
    assert simulate(Random(3), reqs, 2).hits == simulate(Random(3), reqs, 2).hits
    with pytest.raises(ValueError, match="unknown cache policy 'mru'"):
        make_policy("mru")
