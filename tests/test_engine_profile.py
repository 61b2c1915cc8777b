"""tools/engine_profile.py: the saturation profile accounts for every step and token, and does
not change the engine's outputs (the timing hook on route_prompt is removed afterwards)."""

import sys
from pathlib import Path

import numpy as np

from readme_jax.serve.backend import ModelBackend
from readme_jax.serve.engine import Engine, EngineConfig, ServeRequest
from readme_jax.testing import tiny_serve_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tools/
from tools.engine_profile import profile  # noqa: E402


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
