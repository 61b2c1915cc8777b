"""Serving engine: outputs invariant to batching, cache policy, capacity and prefetch, and equal
to serving each request alone; no request lost or starved; bad requests rejected clearly; the
store mirrors the cache; the replay backend reproduces a run's schedule exactly."""

import numpy as np
import pytest

from readme_jax.model.sampling import SamplingParams
from readme_jax.serve.backend import ModelBackend, ReplayBackend
from readme_jax.serve.bench.replay import replay_check
from readme_jax.serve.bench.trace import LengthDist, make_trace
from readme_jax.serve.cache import EMPTY
from readme_jax.serve.engine import Engine, EngineConfig, ServeRequest, StepClock, generate
from readme_jax.testing import tiny_serve_model

N, T, Q = 4, 64, 8
BASE = EngineConfig(num_slots=N, max_len=T, prefill_chunk=Q, max_batch_tokens=16, max_wait=6)


@pytest.fixture(scope="module")
def model():
    return tiny_serve_model(num_experts=4, seed=0)


@pytest.fixture(scope="module")
def backend(model):
    return ModelBackend.for_config(model.params, BASE)


def _requests(n=7, seed=0, sampled=()):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        sp = SamplingParams(0.9, 0, 0.95) if i in sampled else SamplingParams()
        prompt = rng.integers(3, 97, int(rng.integers(3, 24))).tolist()
        out.append(ServeRequest(i, prompt, int(rng.integers(2, 10)), 0.5 * i, sp, seed=i))
    return out


def _run(backend, reqs, **kw):
    cfg = EngineConfig(**{**BASE.__dict__, **kw})
    return Engine(backend, cfg, StepClock(1.0)).run(reqs)


def _tokens(run):
    return {r.id: r.tokens for r in run.results}


def test_outputs_identical_across_batching_cache_policy_and_alone(backend):
    reqs = _requests(sampled=(2, 5))
    ref = _run(backend, reqs)
    assert all(r.status == "ok" and r.tokens for r in ref.results)
    grid = [
        ("expert", "lru", 2, False),
        ("decode", "belady", 2, True),
        ("prefill", "lfu", 2, False),
        ("cache", "random", 2, False),
        ("prefill", "all", None, False),
        ("expert", "belady", 2, True),
    ]
    schedules = set()
    for b, p, c, pf in grid:
        run = _run(backend, reqs, batching=b, cache_policy=p, capacity=c, prefetch=pf)
        assert _tokens(run) == _tokens(ref), (b, p, c, pf)
        schedules.add(tuple(tuple(s["decode"]) for s in run.steps))
        if c is not None:
            assert run.cache_stats.misses > 0  # the offloaded path really loaded experts
    assert len(schedules) > 2  # the batching policies did produce different schedules
    capped = _run(backend, reqs, batching="expert", cache_policy="lru", capacity=2, max_experts=1)
    assert _tokens(capped) == _tokens(ref)  # the expert cap changes the schedule only
    for r in reqs[:3] + reqs[5:6]:  # each request served alone, in another slot mix
        assert _tokens(_run(backend, [r], cache_policy="lru", capacity=2)) == {
            r.id: _tokens(ref)[r.id]
        }


def test_no_request_lost_or_starved_under_a_bursty_trace(backend):
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 97, 30) for _ in range(10)]
    trace = make_trace(
        prompts,
        16,
        4.0,
        cv=4.0,
        output_len=LengthDist("uniform", lo=2, hi=8),
        prompt_len=LengthDist("uniform", lo=2, hi=20),
        seed=3,
    )
    reqs = [ServeRequest(t.id, list(t.prompt_tokens), t.max_new_tokens, t.arrival_s) for t in trace]
    assert np.diff([t.arrival_s for t in trace]).max() > 5 * np.median(
        np.diff([t.arrival_s for t in trace])
    )
    for b in ("expert", "prefill", "decode"):
        run = _run(backend, reqs, batching=b, cache_policy="belady", capacity=2)
        assert sorted(r.id for r in run.results) == list(range(16))
        for r in run.results:
            assert r.status == "ok"
            assert r.finish_reason in ("eos", "length")
            assert r.finish_reason == "eos" or len(r.tokens) == reqs[r.id].max_new_tokens
            assert r.arrival_s <= r.first_token_s <= r.finish_s
        # fairness: while decoding, a request is never skipped more than max_wait steps
        for r in run.results:
            served = [s["step"] for s in run.steps if r.id in s["decode"] or r.id in s["prefill"]]
            assert np.diff(served).max(initial=1) <= BASE.max_wait + 1, (b, r.id)


def test_overlong_and_bad_prompts_are_rejected_while_others_complete(backend):
    reqs = _requests(4)
    reqs += [
        ServeRequest(10, list(range(3, 60)), 20),  # 57 + 20 > T = 64
        ServeRequest(11, [5, 500, 7], 4),  # token id outside the vocabulary
        ServeRequest(12, [], 4),
    ]
    run = _run(backend, reqs, cache_policy="lru", capacity=2)
    res = {r.id: r for r in run.results}
    assert res[10].status == "error" and "exceeds the serving context of 64" in res[10].error
    assert "57 tokens" in res[10].error and "max_new_tokens=20" in res[10].error
    assert res[11].status == "error" and "outside the vocabulary" in res[11].error
    assert res[12].status == "error" and "empty" in res[12].error
    assert all(res[i].status == "ok" and res[i].tokens for i in range(4))
    good = _run(backend, reqs[:4], cache_policy="lru", capacity=2)
    assert {i: res[i].tokens for i in range(4)} == _tokens(good)


def test_store_slots_mirror_the_cache_and_the_log_replays(backend):
    run = _run(backend, _requests(6, seed=4), cache_policy="belady", capacity=2, prefetch=True)
    st = replay_check(run.cache_log)
    assert (st.hits, st.misses, st.loads) == (
        run.cache_stats.hits,
        run.cache_stats.misses,
        run.cache_stats.loads,
    )
    groups = [g for s in run.steps for c in s["calls"] for g in c["groups"]]
    assert st.misses > 0 and all(len(g) <= 2 for g in groups)
    assert any(len(c["groups"]) > 1 for s in run.steps for c in s["calls"])  # streamed waves
    # after the run, device slot s holds exactly the expert the log last put there
    slots = [EMPTY] * 2
    for rec in run.cache_log[1:]:
        if rec["kind"] == "prefetch" or (
            rec["kind"] == "access" and not rec["hit"] and not rec["prefetched"]
        ):
            slots[rec["slot"]] = rec["expert"]
    assert [backend.store.expert_in(s) for s in range(2)] == [
        None if e == EMPTY else e for e in slots
    ]


def test_replay_backend_reproduces_the_schedule_exactly(backend, model):
    reqs = _requests(6, seed=5)
    real = _run(backend, reqs, batching="expert", cache_policy="lfu", capacity=2, prefetch=True)
    sp = model.params
    recs = {r.id: r for r in real.results}
    rb = ReplayBackend(
        recs,
        num_experts=4,
        eos_ids=(2,),
        vocab_size=97,
        bytes_per_expert=backend.bytes_per_expert,
        num_slots=N,
    )
    sim = _run(rb, reqs, batching="expert", cache_policy="lfu", capacity=2, prefetch=True)
    assert sim.cache_log == real.cache_log
    drop = ("wall_s",)
    assert [{k: v for k, v in s.items() if k not in drop} for s in sim.steps] == [
        {k: v for k, v in s.items() if k not in drop} for s in real.steps
    ]
    assert sp.num_experts == 4


def test_generate_moe_reports_cache_statistics(model, backend):
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    streamed = []
    kw = dict(max_len=T, num_slots=N, prefill_chunk=Q, backend=backend)
    out = generate(
        model.params,
        prompts,
        6,
        capacity=2,
        cache_policy="belady",
        on_token=lambda i, t: streamed.append((i, t)),
        **kw,
    )
    assert [len(t) for t in out.tokens] == [len(r.tokens) for r in out.results]
    assert sorted(streamed) == sorted((i, t) for i, ts in enumerate(out.tokens) for t in ts)
    st = out.stats
    assert st["capacity"] == 2 and st["hits"] + st["misses"] > 0 and st["bytes_moved"] > 0
    full = generate(model.params, prompts, 6, capacity=None, **kw)
    assert full.tokens == out.tokens and full.stats["policy"] == "all"


def test_lookahead_decode_changes_no_output(model):
    """The lookahead step (next decode dispatched before this one is read) is taken, rewound
    when requests finish, and dropped when a prefill comes first; outputs stay identical."""
    be = ModelBackend.for_config(model.params, BASE)
    reqs = _requests(n=6, seed=3, sampled=(1, 4))
    outs = {}
    for batching in ("expert", "prefill"):
        for la in (False, True):
            be.lookahead_stats = {"hits": 0, "dropped": 0}
            run = _run(be, reqs, lookahead=la, batching=batching)
            assert all(r.status == "ok" for r in run.results)
            outs[batching, la] = _tokens(run)
            if la:
                assert be.lookahead_stats["hits"] > 0, be.lookahead_stats
            else:
                assert be.lookahead_stats == {"hits": 0, "dropped": 0}
    assert outs["expert", True] == outs["expert", False] == outs["prefill", False]
    assert outs["prefill", True] == outs["prefill", False]
    # a live session: request 1 arrives mid-decode of request 0, and the scheduler runs its
    # prefill first (prefill priority): the pending lookahead step is dropped and rewound
    alone = {}
    for la in (False, True):
        be.lookahead_stats = {"hits": 0, "dropped": 0}
        eng = Engine(be, EngineConfig(**{**BASE.__dict__, "lookahead": la, "batching": "prefill"}))
        eng.start()
        eng.submit(ServeRequest(0, [5, 6, 7, 8], 9))
        for _ in range(4):
            eng.step()
        eng.submit(ServeRequest(1, list(range(9, 25)), 5))  # 16 tokens: the whole budget
        while eng.has_work:
            eng.step()
        alone[la] = _tokens(eng.result())
        if la:
            assert be.lookahead_stats["dropped"] >= 1, be.lookahead_stats
    assert alone[True] == alone[False]
