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

from readme_jax.model import llama, moe
from readme_jax.model.config import LlamaConfig
from readme_jax.model.moe import MoEConfig
from readme_jax.model.router import (
    RouterConfig,
    init_router_cache,
    router_logits,
    top_k_routing,
)

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ReadMEConfig:
    model: LlamaConfig
    moe: MoEConfig
    router: RouterConfig = RouterConfig()

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.to_dict(),
            "moe": dataclasses.asdict(self.moe),
            "router": dataclasses.asdict(self.router),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ReadMEConfig:
        return cls(
            LlamaConfig.from_dict(d["model"]), MoEConfig(**d["moe"]), RouterConfig(**d["router"])
        )

    def replace(self, **kw) -> ReadMEConfig:
        return dataclasses.replace(self, **kw)


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
