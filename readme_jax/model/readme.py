"""The Read-ME model: pre-gating router + MoE backbone, as one pure forward.

params = {"backbone": MoE params (moe.py), "router": router params (router.py)}; the layer-wise
baseline has no "router" (its gates live in the backbone layers).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from readme_jax.model import llama, moe
from readme_jax.model.config import ReadMEConfig
from readme_jax.model.router import (
    Router,
    init_router,
    router_logits,
    top_k_routing,
)

Params = dict[str, Any]


def route(
    params: Params,
    tokens_BxS,
    rc: ReadMEConfig,
    segment_ids_BxS=None,
    *,
    cache: Params | None = None,
    num_new_B=None,
):
    """The pre-gating router on `tokens_BxS`: (logits [B, S, E], (experts [B, S, A], weights
    [B, S, A]), the router's updated KV cache or None). The one routing function: training,
    evaluation, the forward, and every decode step (with `cache`) call it."""
    logits, cache = router_logits(
        params["router"],
        tokens_BxS,
        rc.router,
        rc.model,
        segment_ids_BxS=segment_ids_BxS,
        cache=cache,
        num_new_B=num_new_B,
    )
    return logits, top_k_routing(logits, rc.moe.top_k, rc.moe.gate_scaling), cache


def readme_forward(
    params: Params,
    tokens_BxS: jax.Array,
    rc: ReadMEConfig,
    *,
    segment_ids_BxS=None,
    positions_BxS=None,
    routing=None,
    mesh=None,
    return_hidden: bool = False,
) -> tuple[jax.Array, dict[str, Any]]:
    """Logits (or final hidden) and aux {"router_logits", "routing", "layer_logits"}.

    `routing` overrides the router (oracle routing for evaluation)."""
    aux: dict[str, Any] = {"router_logits": None, "routing": routing, "layer_logits": None}
    if routing is None and not rc.moe.layerwise:
        aux["router_logits"], routing, _ = route(params, tokens_BxS, rc, segment_ids_BxS)
        aux["routing"] = routing
    out, _, layer_aux = moe.moe_forward(
        params["backbone"],
        tokens_BxS,
        rc.model,
        rc.moe,
        routing,
        mesh=mesh,
        segment_ids_BxS=segment_ids_BxS,
        positions_BxS=positions_BxS,
        return_hidden=return_hidden,
    )
    aux["layer_logits"] = layer_aux
    return out, aux


def init_readme_params(
    rc: ReadMEConfig, shared_width: int, expert_width: int, key: jax.Array
) -> Params:
    """A random Read-ME model (layers stacked [L, ...]): a random Llama backbone whose FFNs are
    random MoE layers (`moe.init_moe_layer`) and, unless layer-wise, a random router. For tests
    and from-scratch work; a real one comes from refactoring a dense model."""
    k_body, k_ffn, k_router = jax.random.split(key, 3)
    dense = llama.init_params(rc.model, k_body)
    dtype = dense["embed"].dtype
    layers = {k: v for k, v in dense["layers"].items() if k not in ("w_gate_up", "w_down")}
    ffns = [
        moe.init_moe_layer(rc.moe, rc.model.dim, shared_width, expert_width, k, dtype)
        for k in jax.random.split(k_ffn, rc.model.n_layers)
    ]
    layers.update(jax.tree.map(lambda *a: jnp.stack(a), *ffns))
    params = {"backbone": {**dense, "layers": layers}}
    if not rc.moe.layerwise:
        params["router"] = init_router(
            rc.router, rc.model, rc.moe.num_experts, k_router, dense["embed"]
        )
    return params


class ReadME(nnx.Module):
    """Flax NNX Read-ME model: the pre-gating `Router` (a submodule; none for the layer-wise
    baseline) and the MoE backbone's parameters as nnx.Param leaves; calls `readme_forward`, so
    the model goes through nnx.split / nnx.merge for jit like the dense `llama.Llama`.

    `model(tokens_BxS, **kw)` -> logits [B, S, V] (kw as `readme_forward`: segment_ids_BxS,
    positions_BxS, routing, mesh, return_hidden). Without `params`, a random model
    (`init_readme_params` with `shared_width` / `expert_width`, key from `rngs.params()`)."""

    def __init__(
        self,
        rc: ReadMEConfig,
        params: Params | None = None,
        *,
        shared_width: int | None = None,
        expert_width: int | None = None,
        rngs: nnx.Rngs | None = None,
    ):
        self.rc = rc
        if params is None:
            if None in (shared_width, expert_width):
                raise ValueError("ReadME needs params, or shared_width and expert_width")
            key = (rngs or nnx.Rngs(0)).params()
            params = init_readme_params(rc, shared_width, expert_width, key)
        layerwise = rc.moe.layerwise
        self.router = None if layerwise else Router(rc.router, rc.model, rc.moe, params["router"])
        self.backbone = nnx.data(jax.tree.map(nnx.Param, params["backbone"]))

    @property
    def params(self) -> Params:
        """{"backbone": ..., "router": ...} as plain arrays (what `readme_forward` takes)."""
        backbone = jax.tree.map(
            lambda p: p[...], self.backbone, is_leaf=lambda x: isinstance(x, nnx.Param)
        )
        out = {"backbone": backbone}
        if self.router is not None:
            out["router"] = self.router.params
        return out

    def __call__(self, tokens_BxS: jax.Array, **kw) -> jax.Array:
        logits, _ = readme_forward(self.params, tokens_BxS, self.rc, **kw)
        return logits
