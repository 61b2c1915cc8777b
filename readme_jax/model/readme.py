"""The Read-ME model: pre-gating router + MoE backbone, as one pure forward.

params = {"backbone": MoE params (moe.py), "router": router params (router.py)}; the layer-wise
baseline has no "router" (its gates live in the backbone layers).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from readme_jax.model import llama, moe
from readme_jax.model.config import ReadMEConfig
from readme_jax.model.router import (
    Router,
    init_router,
    init_router_cache,
    router_logits,
    top_k_routing,
)

Params = dict[str, Any]


def route(params: Params, tokens_BxS, rc: ReadMEConfig, segment_ids_BxS=None):
    """Router logits [B, S, E] and the routing (experts, weights) they imply."""
    logits, _ = router_logits(
        params["router"], tokens_BxS, rc.router, rc.model, segment_ids_BxS=segment_ids_BxS
    )
    return logits, top_k_routing(logits, rc.moe.top_k, rc.moe.gate_scaling)


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
        aux["router_logits"], routing = route(params, tokens_BxS, rc, segment_ids_BxS)
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


def decode_model(rc: ReadMEConfig, dispatch: str = "select"):
    """A `generate.DecodeModel` for Read-ME: each step the router routes the new tokens (with its
    own KV cache), then the MoE backbone runs them. `select` dispatch reads only the experts
    that the step's tokens use."""
    from readme_jax.model.generate import DecodeModel, HostRouted

    mcfg = dataclasses.replace(rc.moe, dispatch=dispatch)

    def step(params, tokens_BxS, cache, num_new_B, last_B=None):
        rlog, rcache = router_logits(
            params["router"],
            tokens_BxS,
            rc.router,
            rc.model,
            cache=cache["router"],
            num_new_B=num_new_B,
        )
        routing = top_k_routing(rlog, mcfg.top_k, mcfg.gate_scaling)
        logits, bcache, _ = moe.moe_forward(
            params["backbone"],
            tokens_BxS,
            rc.model,
            mcfg,
            routing,
            cache=cache["backbone"],
            num_new_B=num_new_B,
            last_B=last_B,
        )
        return logits, {"backbone": bcache, "router": rcache}

    def new_cache(batch, max_len):
        return {
            "backbone": llama.init_cache(
                rc.model, batch, max_len, per_layer=not rc.model.scan_layers
            ),
            "router": init_router_cache(rc.router, rc.model, batch, max_len, per_layer=True),
        }

    def prepare(params):
        return {
            "backbone": moe.unstack_experts(
                params["backbone"],
                trim=dispatch == "select",
                fuse_shared=dispatch == "select" and mcfg.top_k == 1,
            ),
            "router": llama.unstack_layers(params["router"]),
        }

    host = None
    if dispatch == "select" and mcfg.top_k == 1 and not mcfg.gate_scaling:
        host = HostRouted(_split_fused, partial(_expert_step, rc.model), partial(_route_step, rc))
    return DecodeModel(rc.model, step, new_cache, prepare, host)


_EXPERT_KEYS = ("shared_", "expert_", "fused_")


def _split_fused(prepared: Params) -> tuple[Params, list[Params]]:
    """(common params, per expert its fused FFN [(gate_up, down) per layer]); no copies."""
    bb = prepared["backbone"]
    layers = [
        {k: v for k, v in lp.items() if not k.startswith(_EXPERT_KEYS)} for lp in bb["layers"]
    ]
    common = {"backbone": {**bb, "layers": layers}, "router": prepared["router"]}
    E = len(bb["layers"][0]["fused_down"])
    experts = [
        [(lp["fused_gate_up"][e], lp["fused_down"][e]) for lp in bb["layers"]] for e in range(E)
    ]
    return common, experts


def _expert_step(cfg, common, expert, tokens_BxS, cache):
    """The backbone as a dense model whose FFNs are one expert's fused FFNs."""
    bb = common["backbone"]
    layers = [
        {**lp, "w_gate_up": gu, "w_down": down}
        for lp, (gu, down) in zip(bb["layers"], expert, strict=True)
    ]
    logits, bcache, _ = llama.forward(
        {**bb, "layers": layers}, tokens_BxS, cfg, cache=cache["backbone"]
    )
    return logits, {**cache, "backbone": bcache}


def _route_step(rc, common, tokens_BxS, cache):
    """The router on the new tokens (its cache grows): the last token's expert per row."""
    rlog, rcache = router_logits(
        common["router"], tokens_BxS, rc.router, rc.model, cache=cache["router"]
    )
    return jnp.argmax(rlog[:, -1], axis=-1).astype(jnp.int32), {**cache, "router": rcache}


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
