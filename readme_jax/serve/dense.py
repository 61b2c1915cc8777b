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

from readme_jax.model.config import LlamaConfig, MoEConfig, ReadMEConfig, RouterConfig
from readme_jax.model.router import init_router
from readme_jax.serve.decode import ServeParams, split_params

DENSE_ROUTER = RouterConfig(dim=16, n_heads=1, ffn_dim=16)


def dense_moe_layers(layers: dict) -> dict:
    """Stacked dense layers {"w_gate_up": [L, D, 2, F], "w_down": [L, F, D], ...} -> the
    Read-ME layout: shared part = the whole FFN; one expert of one zero channel
    ({"expert_gate_up": [L, 1, D, 2, 1], "expert_down": [L, 1, 1, D]})."""
    gu, dn = np.asarray(layers["w_gate_up"]), np.asarray(layers["w_down"])
    L, D = gu.shape[0], gu.shape[1]
    out = {k: v for k, v in layers.items() if k not in ("w_gate_up", "w_down")}
    return out | {
        "shared_gate_up": gu,
        "shared_down": dn,
        "expert_gate_up": np.zeros((L, 1, D, 2, 1), gu.dtype),
        "expert_down": np.zeros((L, 1, 1, D), dn.dtype),
    }


def dense_serve_params(cfg: LlamaConfig, params, seed: int = 0) -> ServeParams:
    """Dense Llama params (layers stacked [L, ...], as `checkpoints.models.load_dense` returns)
    -> `ServeParams` computing the same function (see the module docstring)."""
    if isinstance(params["layers"], list):
        raise ValueError("dense_serve_params needs stacked layers (scan_layers=False loading)")
    rc = ReadMEConfig(cfg, MoEConfig(1, top_k=1, dispatch="select"), DENSE_ROUTER)
    router = init_router(DENSE_ROUTER, cfg, 1, jax.random.key(seed))
    backbone = {**params, "layers": dense_moe_layers(params["layers"])}
    return split_params(rc, {"backbone": backbone, "router": router})
