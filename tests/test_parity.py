"""Parity of the dense forward with Hugging Face transformers' PyTorch LlamaForCausalLM.

The committed fixtures (tests/fixtures/*, built by `.venv-peer/bin/python tools/make_fixtures.py`)
hold tiny random HF checkpoints and the PyTorch logits for fixed tokens. The `torch`-marked tests
run the peer live, in a Python that has torch: $READMEJAX_PEER_PYTHON, this interpreter if torch
imports, or the repo's `.venv-peer/bin/python`; they skip when none exists.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from readme_jax.checkpoints.hf import load_hf, save_hf
from readme_jax.model.llama import forward, init_cache

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
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


def _peer_python() -> str | None:
    if os.environ.get("READMEJAX_PEER_PYTHON"):
        return os.environ["READMEJAX_PEER_PYTHON"]
    if importlib.util.find_spec("torch") is not None:
        return sys.executable
    venv = ROOT / ".venv-peer" / "bin" / "python"
    return str(venv) if venv.exists() else None


def _run_peer(model_dir: Path, tokens_BxS: np.ndarray, tmp_path: Path) -> np.ndarray:
    python = _peer_python()
    if python is None:
        pytest.skip("no Python with torch (set READMEJAX_PEER_PYTHON or create .venv-peer)")
    tok, out = tmp_path / "tokens.npy", tmp_path / "peer_logits.npy"
    np.save(tok, tokens_BxS)
    proc = subprocess.run(
        [python, str(ROOT / "tools" / "peer_logits.py"), str(model_dir), str(tok), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"peer failed:\n{proc.stderr[-3000:]}"
    return np.load(out)


@pytest.mark.torch
@pytest.mark.parametrize("name", NAMES)
def test_live_peer_on_fresh_tokens(name, tmp_path):
    d = FIXTURES / name
    cfg, params = load_hf(d)
    seed = time.time_ns() % 2**32
    tokens_BxS = np.random.default_rng(seed).integers(0, cfg.vocab_size, (3, 40), dtype=np.int32)
    peer = _run_peer(d, tokens_BxS, tmp_path)
    diff = np.abs(_logits(params, tokens_BxS, cfg) - peer).max()
    assert diff < ATOL, f"max |ours - peer| = {diff} (token seed {seed})"


@pytest.mark.torch
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_live_peer_reads_what_save_hf_writes(dtype, tmp_path):
    # transformers must load our files (legacy rope_scaling config, our safetensors writer,
    # bf16 bytes included) and compute the logits we compute from the same weights.
    cfg, params = load_hf(FIXTURES / "llama3_tied", dtype=dtype)
    out = save_hf(tmp_path / "saved", cfg, params, max_shard_bytes=50_000)
    cfg32, params32 = load_hf(out, dtype="float32")
    _, tokens_BxS, _ = _fixture("llama3_tied")
    peer = _run_peer(out, tokens_BxS, tmp_path)
    diff = np.abs(_logits(params32, tokens_BxS, cfg32) - peer).max()
    assert diff < ATOL, f"max |ours - peer| = {diff}"
