"""Shared helpers of the checkpoint-loading tests (tests/checkpoints/test_load_matrix.py and
test_load_faults.py): the committed fixtures of tools/make_load_fixtures.py (one directory per
Llama-family style: an HF checkpoint, the PyTorch logits of fixed tokens, the runtime's token
ids) and our logits of them. (No tests here.)"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from readme_jax.model.llama import forward

FIXTURES = Path(__file__).resolve().parent / "fixtures"
ATOL = 1e-4  # our logits vs PyTorch's, float32
_forward = jax.jit(forward, static_argnames=("cfg",))


def fixture(style: str) -> Path:
    """The fixture directory of a style: llama2, llama3, smollm2 or mistral."""
    return FIXTURES / f"load_{style}"


def golden(style: str) -> dict:
    """The runtime's token ids of a style's probes and chat prompt."""
    return json.loads((fixture(style) / "golden.json").read_text())


def logits_of(cfg, params, tokens_BxS) -> np.ndarray:
    """float32 logits [B, S, V] of our forward."""
    return np.asarray(_forward(params, jnp.asarray(tokens_BxS), cfg)[0], np.float32)
