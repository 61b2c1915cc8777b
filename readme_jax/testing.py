"""Test doubles: tiny random Llama and Read-ME models (NumPy init, no per-shape XLA compiles),
and the spelling of random checkpoints.

  sm = tiny_serve_model(num_experts=4, seed=0)        # a servable 2-layer, width-32 Read-ME
  m = tiny_readme(num_experts=4)                      # the same as a ReadMEModel
  ck = random_checkpoint(vocab=256, dim=32, layers=2, heads=4, kv_heads=2, ffn=64)

A "random:..." checkpoint string is loaded by `checkpoints/models.py` (configs/tiny.py uses one
for the smoke run, so the loader, not this module, owns its parsing).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from readme_jax.checkpoints.models import RANDOM_PREFIX, ReadMEModel
from readme_jax.model import llama
from readme_jax.model.config import LlamaConfig, MoEConfig, ReadMEConfig, RouterConfig
from readme_jax.refactor.experts import build_expert_spec, build_moe_params
from readme_jax.serve.model import ServeModel, serve_model


def random_checkpoint(**dims: int) -> str:
    """ "random:vocab=..,dim=..": a random-init checkpoint string for `checkpoints.models`."""
    return RANDOM_PREFIX + ",".join(f"{k}={v}" for k, v in dims.items())


def np_init(shapes: dict, rng: np.random.Generator) -> dict:
    """Random params in NumPy (normal, std 0.02; norms at 1): no per-shape XLA compiles."""
    out = {}
    for k, v in shapes.items():
        if isinstance(v, dict):
            out[k] = np_init(v, rng)
        elif "norm" in k:
            out[k] = np.ones(v, np.float32)
        else:
            out[k] = (0.02 * rng.standard_normal(v)).astype(np.float32)
    return out


def tiny_llama_config(vocab: int = 97) -> LlamaConfig:
    """2 layers, D=32, H=4, K=2, F=48, M=256 (max positions), tied embeddings."""
    return LlamaConfig(
        vocab_size=vocab,
        dim=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        ffn_dim=48,
        max_seq_len=256,
        tie_embeddings=True,
        eos_ids=(2,),
        bos_id=1,
    )


def tiny_readme(num_experts: int = 4, seed: int = 0, *, vocab: int = 97) -> ReadMEModel:
    """A random tiny Read-ME model (select dispatch, random expert split at remain rate 0.5)."""
    cfg = tiny_llama_config(vocab)
    rc = ReadMEConfig(cfg, MoEConfig(num_experts, dispatch="select"), RouterConfig(16, 2, 32))
    rng = np.random.default_rng(seed)
    dense = np_init(llama.param_shapes(cfg), rng)
    router = np_init(llama.param_shapes(rc.router.backbone(cfg)), rng)
    router["head"] = (0.3 * rng.standard_normal((rc.router.dim, num_experts))).astype(np.float32)
    scores = rng.random((num_experts, cfg.n_layers, cfg.ffn_dim))
    spec = build_expert_spec(scores, 0.5, [f"d{i}" for i in range(num_experts)])
    params: dict[str, Any] = {"backbone": build_moe_params(dense, spec), "router": router}
    return ReadMEModel(rc, params, spec, {"recipe": {"checkpoint": "random:tiny"}})


def tiny_serve_model(num_experts: int = 4, seed: int = 0, *, vocab: int = 97) -> ServeModel:
    """`tiny_readme` split for serving (no tokenizer) for tests and smoke runs."""
    m = tiny_readme(num_experts, seed, vocab=vocab)
    return serve_model(m, None, f"random tiny model (seed {seed})")
