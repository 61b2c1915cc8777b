"""Parity of the dense forward with Hugging Face transformers' PyTorch LlamaForCausalLM.

The committed fixtures (tests/fixtures/*, built by `.venv-peer/bin/python tools/make_fixtures.py`)
hold tiny random HF checkpoints and the PyTorch logits for fixed tokens. The `torch`-marked tests
run the peer live, in one process for the module (tests/peer.py: $READMEJAX_PEER_PYTHON, the
repo's `.venv-peer/bin/python`, or this interpreter if torch imports); they skip when none exists.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from peer import peer_logits_many

from readme_jax.checkpoints.hf import load_hf, save_hf
from readme_jax.model.llama import forward, init_cache

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
NAMES = ["llama_gqa", "llama3_tied"]
ATOL = 1e-4
# Jitted so the cached decode loop compiles once instead of dispatching op by op.
_forward = jax.jit(forward, static_argnames=("cfg",))


def _fixture(name: str):
    d = FIXTURES / name
    return d, np.load(d / "tokens.npy"), np.load(d / "logits.npy")


def _logits(params, tokens_BxS, cfg) -> np.ndarray:
    logits_BxSxV, _, _ = _forward(params, jnp.asarray(tokens_BxS), cfg)
    return np.asarray(logits_BxSxV, np.float32)


@pytest.mark.parametrize("scan_layers", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_logits_match_committed_pytorch_logits(name, scan_layers):
    d, tokens_BxS, ref_BxSxV = _fixture(name)
    cfg, params = load_hf(d, cfg_overrides={"scan_layers": scan_layers})
    np.testing.assert_allclose(_logits(params, tokens_BxS, cfg), ref_BxSxV, rtol=0, atol=ATOL)


def test_llama3_fixture_depends_on_rope_scaling():
    # Guards the fixture itself: if scaling did not change the logits, parity would not test it.
    d, tokens_BxS, ref_BxSxV = _fixture("llama3_tied")
    cfg, params = load_hf(d, cfg_overrides={"rope_scaling": None})
    assert np.abs(_logits(params, tokens_BxS, cfg) - ref_BxSxV).max() > 100 * ATOL


@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_kv_cache_decode_matches_full_forward(name, per_layer):
    d, tokens_BxS, ref_BxSxV = _fixture(name)
    cfg, params = load_hf(d)
    B, S = tokens_BxS.shape
    prefill = 9
    cache = init_cache(cfg, B, S + 3, per_layer=per_layer)
    assert isinstance(cache["k"], list) == per_layer
    logits, cache, _ = _forward(params, jnp.asarray(tokens_BxS[:, :prefill]), cfg, cache=cache)
    steps = [np.asarray(logits)]
    for t in range(prefill, S):
        logits, cache, _ = _forward(params, jnp.asarray(tokens_BxS[:, t : t + 1]), cfg, cache=cache)
        steps.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), ref_BxSxV, rtol=0, atol=ATOL)
    assert np.asarray(cache["lengths"]).tolist() == [S] * B


# --- live comparison against the PyTorch peer ------------------------------------------------


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """One peer process for every live comparison of this module: each fixture on fresh random
    tokens, and what `save_hf` writes (f32 and bf16) on the committed tokens."""
    tmp = tmp_path_factory.mktemp("peer")
    seed = time.time_ns() % 2**32
    rng = np.random.default_rng(seed)
    jobs, ours = [], {}
    for name in NAMES:
        cfg, params = load_hf(FIXTURES / name)
        tokens_BxS = rng.integers(0, cfg.vocab_size, (3, 40), dtype=np.int32)
        jobs.append((FIXTURES / name, tokens_BxS))
        ours[name] = (cfg, params, tokens_BxS)
    for dtype in ("float32", "bfloat16"):
        # transformers must load our files (legacy rope_scaling config, our safetensors writer,
        # bf16 bytes included) and compute the logits we compute from the same weights
        cfg, params = load_hf(FIXTURES / "llama3_tied", dtype=dtype)
        out = save_hf(tmp / f"saved_{dtype}", cfg, params, max_shard_bytes=50_000)
        cfg32, params32 = load_hf(out, dtype="float32")
        _, tokens_BxS, _ = _fixture("llama3_tied")
        jobs.append((out, tokens_BxS))
        ours[dtype] = (cfg32, params32, tokens_BxS)
    peer = peer_logits_many(jobs, tmp)
    return {k: (*v, p) for (k, v), p in zip(ours.items(), peer, strict=True)}, seed


@pytest.mark.torch
@pytest.mark.parametrize("name", NAMES)
def test_live_peer_on_fresh_tokens(name, live):
    runs, seed = live
    cfg, params, tokens_BxS, peer = runs[name]
    diff = np.abs(_logits(params, tokens_BxS, cfg) - peer).max()
    assert diff < ATOL, f"max |ours - peer| = {diff} (token seed {seed})"


@pytest.mark.torch
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_live_peer_reads_what_save_hf_writes(dtype, live):
    cfg, params, tokens_BxS, peer = live[0][dtype]
    diff = np.abs(_logits(params, tokens_BxS, cfg) - peer).max()
    assert diff < ATOL, f"max |ours - peer| = {diff}"
