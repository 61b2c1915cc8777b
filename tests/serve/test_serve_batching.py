"""Batching policies: expert grouping, budgets, slots, fairness under bursty load."""

import numpy as np
import pytest

from readme_jax.serve.batching import (
    DECODING,
    WAITING,
    Request,
    age,
    schedule,
    simulate_schedule,
)
from readme_jax.serve.bench.trace import arrival_times

E = 8


def decoding(i, expert, arrival=0):
    return Request(i, 4, 10, arrival, DECODING, generated=1, next_expert=expert)


def test_expert_aware_takes_the_longest_queue_first():
    ready = [decoding(i, e) for i, e in enumerate([0, 1, 1, 2, 1, 0, 3])]
    b = schedule("expert", ready, 4)
    assert b.decode == [1, 2, 4, 0] and b.experts == [0, 1] and b.tokens == 4
    d = schedule("decode", ready, 4)
    assert d.decode == [0, 1, 2, 3] and d.experts == [0, 1, 2]


def test_cache_aware_prefers_resident_experts_and_equals_expert_aware_without_a_cache():
    ready = [decoding(i, e) for i, e in enumerate([0, 1, 1, 2, 1, 0, 3])]
    # expert 1 has the longest queue (3 tokens); with 0 and 3 resident those go first, longest
    # (expert 0: 2 tokens) first
    c = schedule("cache", ready, 3, resident={3, 0})
    assert c.decode == [0, 5, 6] and c.experts == [0, 3]
    assert schedule("expert", ready, 3, resident={3, 0}).experts == [1]  # expert ignores it
    for budget in (1, 3, 4, 7):
        a, b = schedule("cache", ready, budget), schedule("expert", ready, budget)
        assert (a.decode, a.experts) == (b.decode, b.experts)
    # the fairness bound still comes first
    ready[3].waiting_steps = 5
    assert schedule("cache", ready, 3, max_wait=5, resident={0}).ids[0] == 3


def test_the_expert_cap_keeps_a_batch_within_max_experts():
    ready = [decoding(i, e) for i, e in enumerate([0, 1, 1, 2, 1, 0, 3])]
    assert schedule("expert", ready, 100).experts == [0, 1, 2, 3]  # the budget does not bind
    b = schedule("expert", ready, 100, max_experts=2)
    assert b.experts == [0, 1] and b.decode == [1, 2, 4, 0, 5]  # longest queues first
    c = schedule("cache", ready, 100, max_experts=2, resident={3})
    assert c.experts == [1, 3] and c.decode == [6, 1, 2, 4]
    for policy in ("decode", "prefill"):  # the baselines ignore the cap
        assert schedule(policy, ready, 100, max_experts=1).experts == [0, 1, 2, 3]
    # a prefill whose experts would pass the cap waits; alone it exceeds the cap, not forever
    wide = Request(9, 5, 3, prompt_experts=[1, 2, 3, 3, 1])
    assert 9 not in schedule("expert", [*ready, wide], 100, max_experts=2).ids
    assert schedule("expert", [wide], 100, max_experts=2).ids == [9]
    # fairness admissions come first and ignore the cap
    ready[6].waiting_steps = 4
    f = schedule("expert", ready, 100, max_wait=4, max_experts=1)
    assert f.ids[0] == 6 and f.experts == [3]  # then no new expert
    with pytest.raises(ValueError, match="max_experts"):
        schedule("expert", ready, 100, max_experts=0)


def test_prefill_and_decode_priorities_and_costs():
    ready = [
        decoding(0, 1),
        Request(1, 5, 3, arrival_step=2, prompt_experts=[2, 2, 3, 3, 3]),
        decoding(2, 1),
    ]
    assert schedule("decode", ready, 6).ids == [0, 2]  # prefill (5) no longer fits
    p = schedule("prefill", ready, 6)
    assert p.prefill == [1] and p.decode == [0] and p.tokens == 6 and p.experts == [1, 2, 3]
    assert ready[1].queue_expert == 3 and ready[1].cost == 5
    # over-budget prompt is admitted alone rather than never
    assert schedule("decode", [Request(7, 50, 3)], 16).ids == [7]


def test_num_slots_limits_new_prefills():
    ready = [decoding(0, 0), Request(1, 2, 3, 1), Request(2, 2, 3, 2)]
    assert schedule("prefill", ready, 100, num_slots=2).prefill == [1]
    assert schedule("prefill", ready, 100, num_slots=1).prefill == []


def test_fairness_admits_a_long_waiting_request_first():
    ready = [decoding(i, 0) for i in range(6)] + [decoding(9, 5)]
    assert 9 not in schedule("expert", ready, 3).ids
    ready[-1].waiting_steps = 4
    assert schedule("expert", ready, 3, max_wait=4).ids[0] == 9
    b = schedule("expert", ready, 3, max_wait=4)
    age(ready, b)
    assert ready[-1].waiting_steps == 0 and ready[5].waiting_steps == 1


def test_unknown_policy_and_bad_budget_are_named():
    with pytest.raises(ValueError, match="unknown batching policy 'fifo'"):
        schedule("fifo", [], 8)
    with pytest.raises(ValueError, match="max_batch_tokens"):
        schedule("expert", [], 0)


def skewed_workload(n, rng, arrival_steps):
    p = np.array([0.4, 0.2, 0.12, 0.1, 0.08, 0.05, 0.03, 0.02])
    reqs = [
        Request(
            i,
            prompt_len=int(rng.integers(4, 24)),
            max_new_tokens=int(rng.integers(8, 40)),
            arrival_step=int(arrival_steps[i]),
            prompt_experts=list(rng.choice(E, size=4, p=p)),
        )
        for i in range(n)
    ]
    router = np.random.default_rng(1)
    return reqs, lambda r: int(router.choice(E, p=p))


def test_expert_aware_batching_needs_fewer_experts_per_batch():
    reqs, route = skewed_workload(60, np.random.default_rng(0), np.zeros(60))
    kw = dict(max_batch_tokens=16, num_slots=32, max_wait=16)
    ea = simulate_schedule("expert", reqs, route, **kw)
    dp = simulate_schedule("decode", reqs, route, **kw)
    pp = simulate_schedule("prefill", reqs, route, **kw)
    assert ea.completed == dp.completed == pp.completed == 60
    assert ea.mean_unique_experts < 0.85 * dp.mean_unique_experts
    assert ea.mean_unique_experts < 0.85 * pp.mean_unique_experts


@pytest.mark.parametrize("policy", ["expert", "cache", "decode", "prefill"])
def test_no_request_starves_under_a_bursty_trace(policy):
    rng = np.random.default_rng(2)
    arrivals = np.floor(arrival_times(120, rate=0.5, rng=rng, cv=4.0)).astype(int)
    reqs, route = skewed_workload(120, rng, arrivals)
    stats = simulate_schedule(policy, reqs, route, 16, max_wait=8, num_slots=32)
    assert stats.completed == 120 and set(stats.finish_step) == {r.id for r in reqs}
    assert stats.max_decode_wait <= 16 and stats.max_queue_wait <= 24
    for b in stats.batches:
        assert b.tokens <= 16 or len(b.ids) == 1


@pytest.mark.parametrize("policy", ["expert", "cache"])
def test_the_expert_cap_fewer_experts_per_batch_and_no_starvation(policy):
    rng = np.random.default_rng(2)
    arrivals = np.floor(arrival_times(120, rate=0.5, rng=rng, cv=4.0)).astype(int)
    reqs, route = skewed_workload(120, rng, arrivals)
    kw = dict(max_wait=8, num_slots=8)
    free = simulate_schedule(policy, reqs, route, 256, **kw)
    capped = simulate_schedule(policy, reqs, route, 256, max_experts=2, **kw)
    assert capped.completed == free.completed == 120
    # decodes wait at most the fairness bound; prompts wait for slots (steps grow: the cap
    # trades steps for experts, which pays only where loading an expert costs time)
    assert capped.max_decode_wait <= 8 and free.max_decode_wait <= 8
    assert capped.mean_unique_experts < 0.8 * free.mean_unique_experts


def test_without_the_fairness_bound_decode_priority_starves_prefills():
    rng = np.random.default_rng(2)
    arrivals = np.floor(arrival_times(120, rate=0.5, rng=rng, cv=4.0)).astype(int)
    reqs, route = skewed_workload(120, rng, arrivals)
    stats = simulate_schedule("decode", reqs, route, 16, max_wait=None, num_slots=32)
    assert stats.max_queue_wait > 10 * 24


def test_requests_are_not_mutated_and_prefill_then_decodes():
    reqs = [Request(0, 3, 4, prompt_experts=[1, 1, 2])]
    stats = simulate_schedule("expert", reqs, lambda r: 5, 8)
    assert reqs[0].state == WAITING and reqs[0].generated == 0
    assert stats.finish_step == {0: 3} and stats.unique_experts == [2, 1, 1, 1]
