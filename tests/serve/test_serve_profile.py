"""serve/bench/profile.py: the saturation profile accounts for every step and token, and does
not change the engine's outputs (the timing hook on route_prompt is removed afterwards)."""

import numpy as np

from readme_jax.serve.backend import ModelBackend
from readme_jax.serve.bench.profile import bench_engine, profile, run_engines
from readme_jax.serve.engine import Engine, EngineConfig, ServeRequest
from readme_jax.testing import tiny_readme, tiny_serve_model


def test_profile_splits_every_step_and_leaves_outputs_unchanged():
    sm = tiny_serve_model(num_experts=4, seed=0)
    cfg = EngineConfig(num_slots=4, max_len=64, prefill_chunk=8, max_batch_tokens=32)
    backend = ModelBackend.for_config(sm.params, cfg)
    rng = np.random.default_rng(0)
    reqs = [
        ServeRequest(i, rng.integers(3, 97, int(rng.integers(3, 20))).tolist(), 5) for i in range(9)
    ]
    eng = Engine(backend, cfg)
    res = profile(eng, reqs)
    plain = Engine(backend, cfg).run(reqs)
    assert res["completion_tokens"] == sum(len(r.tokens) for r in plain.results) == 45
    kinds = res["by_kind"]
    assert sum(v["steps"] for v in kinds.values()) == res["steps"] == len(plain.steps)
    assert any(k.startswith("with ") for k in kinds) and any(k.startswith("decode") for k in kinds)
    assert res["route_prompt_s"] > 0 and res["tok_s"] > 0
    assert "route_prompt" not in vars(backend)  # the timing hook is gone


def test_run_engines_reports_each_configuration_against_dense():
    sm, other = tiny_serve_model(num_experts=4, seed=0), tiny_serve_model(num_experts=4, seed=1)
    base = EngineConfig(num_slots=4, max_len=64, prefill_chunk=8, max_batch_tokens=32)
    rng = np.random.default_rng(1)
    reqs = [ServeRequest(i, rng.integers(3, 97, 12).tolist(), 4) for i in range(12)]
    best = run_engines(base, ("expert",), reqs, sm.params, other.params, rounds=1, log=lambda s: 0)
    assert set(best) == {"Read-ME, expert batching", "dense"}
    assert best["dense"]["vs_dense"] == 1.0 and best["dense"]["completion_tokens"] == 48


def test_engine_and_generator_decode_rates_on_the_same_model():
    m = tiny_readme(vocab=2048)  # the benchmark prompt uses ids 1000..1031
    res = bench_engine(m.rc, m.params, rounds=1, steps=6, max_len=64, log=lambda s: 0)
    for b in (1, 8):
        assert res[f"engine_b{b}"] > 0 and res[f"generator_b{b}"] > 0
        assert res[f"ratio_b{b}"] == res[f"engine_b{b}"] / res[f"generator_b{b}"]
