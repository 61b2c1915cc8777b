"""A dense Llama served by the same engine: the smallest honest adapter.

The serving engine runs Read-ME models (pre-gating router, routed experts in device slots).
A dense model becomes a Read-ME model that computes exactly the dense FFN: its whole FFN is the
shared (always-on) part, and there is E = 1 routed expert of one zero channel (silu(0) * 0 = 0,
so it adds exactly 0), held resident (no expert cache traffic). The engine still runs the
pre-gating router on every token; here it is a minimal one (width 16, one head, FFN 16), whose
output is ignored, and its cost is overhead that the dense model pays in this server only.
"""

from __future__ import annotations

import jax
import numpy as np

from readme_jax.model.config import LlamaConfig
from readme_jax.model.moe import MoEConfig
from readme_jax.model.readme import ReadMEConfig
from readme_jax.model.router import RouterConfig, init_router
from readme_jax.refactor.experts import ExpertSpec, build_moe_params
from readme_jax.serve.decode import ServeParams, split_params

DENSE_ROUTER = RouterConfig(dim=16, n_heads=1, ffn_dim=16)


def dense_spec(cfg: LlamaConfig) -> ExpertSpec:
    """Every FFN channel shared; one routed expert of one padding (zero) channel."""
    L, F = cfg.n_layers, cfg.ffn_dim
    shared = np.tile(np.arange(F, dtype=np.int32), (L, 1))  # [L, F]
    expert = np.full((L, 1, 1), -1, np.int32)  # [L, E=1, Fe=1]: padding only
    return ExpertSpec(["dense"], 1.0, np.ones((1, L, F), bool), shared, expert)


def dense_serve_params(cfg: LlamaConfig, params, seed: int = 0) -> ServeParams:
    """Dense Llama params (layers stacked [L, ...], as `refactor.convert.load_dense` returns)
    -> `ServeParams` computing the same function (see the module docstring)."""
    if isinstance(params["layers"], list):
        raise ValueError("dense_serve_params needs stacked layers (scan_layers=False loading)")
    rc = ReadMEConfig(cfg, MoEConfig(1, top_k=1, dispatch="select"), DENSE_ROUTER)
    router = init_router(DENSE_ROUTER, cfg, 1, jax.random.key(seed))
    moe = build_moe_params(params, dense_spec(cfg))
    return split_params(rc, {"backbone": moe, "router": router})
