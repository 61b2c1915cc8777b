"""The Read-ME model: pre-gating router + MoE backbone, as one pure forward.

params = {"backbone": MoE params (moe.py), "router": router params (router.py)}; the layer-wise
baseline has no "router" (its gates live in the backbone layers).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from readme_jax.model import moe
from readme_jax.model.config import LlamaConfig
from readme_jax.model.moe import MoEConfig
from readme_jax.model.router import RouterConfig, router_logits, top_k_routing

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
