"""serve/bench/sim.py and locality.py: a tiny Read-ME's router routes synthetic documents into
a trace; the simulation writes replayable logs, Belady (whole future) is never beaten, and the
locality point's perplexity is the model's own (no data download: streams built here)."""

import json

import numpy as np
import pytest

from readme_jax.checkpoints import models
from readme_jax.model.config import ConfigError
from readme_jax.serve.bench import cachesim as cs
from readme_jax.serve.bench import locality
from readme_jax.serve.bench.replay import read_log, replay_check
from readme_jax.serve.bench.sim import (
    SimSettings,
    cost_7b,
    markdown,
    router_fn,
    run_trace,
    simulate_checkpoint,
)
from readme_jax.testing import tiny_readme


def _streams(vocab: int, rng) -> dict:
    out = {}
    for d in ("a", "b"):
        toks = rng.integers(3, vocab, 2048).astype(np.int32)
        out[d] = (toks, np.arange(0, 2049, 256))
    return out


def test_a_routed_trace_simulates_with_replayable_logs(tmp_path):
    m = tiny_readme()
    rng = np.random.default_rng(0)
    route = router_fn(m.params, m.rc)
    reqs = cs.routed_requests(route, _streams(97, rng), 16, 4.0, (8, 32), "default", rng)
    s = SimSettings(capacities=(1, 2, 3, 9), expert_caps=(1,))
    res = run_trace("default", reqs, 4, cost_7b(m.spec, m.rc), tmp_path, s)
    assert res["requests"] == 16 and set(res["hit_ratio"]["belady"]) == {1, 2, 3}
    for p in ("lru", "lfu", "random", "online_belady"):
        for C in (1, 2, 3):
            assert res["hit_ratio"]["belady"][C] >= res["hit_ratio"][p][C] - 1e-12
    names = {r["name"] for r in res["batching"]}
    assert "default-expert-C2-cap1" in names and "default-prefill-C4" in names
    for r in res["batching"]:
        st = replay_check(read_log(tmp_path / r["log"]))
        assert st.hit_ratio == pytest.approx(r["cache"]["hit_ratio"])
    md = markdown(json.loads(json.dumps(res, default=str), object_hook=_int_keys))
    assert "| belady |" in md and "expert cap 1" in md


def _int_keys(d):
    return {int(k) if k.isdigit() else k: v for k, v in d.items()}


def test_simulate_checkpoint_rejects_an_expert_cap_of_e(tmp_path):
    m = tiny_readme()
    ck = models.save_readme(tmp_path / "moe", m.params, m.rc, m.spec, m.meta)
    with pytest.raises(ConfigError, match=r"\[1, 3\]"):
        simulate_checkpoint(ck, tmp_path / "out", SimSettings(expert_caps=(4,)))


def test_a_locality_point_measures_the_model_and_plots(tmp_path):
    m = tiny_readme()
    ck = models.save_readme(tmp_path / "moe", m.params, m.rc, m.spec, m.meta)
    streams = _streams(97, np.random.default_rng(1))
    p = locality.measure_point(ck, streams, cost_7b(m.spec, m.rc), eval_tokens=1024)
    assert p["eval_tokens"] == 2 * 2 * 511 and 1 < p["perplexity"] < 97 * 10
    assert 0 <= p["temporal_locality"] <= 1 and 0 <= p["belady_hit_C2"] <= 1
    rows = [{"weight": w, "domain_target": 0.0} | p for w in (0.0, 1.0)]
    locality.plot(rows, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").stat().st_size > 0
