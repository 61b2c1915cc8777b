"""Routers: the Read-ME pre-gating router, and the conventional layer-wise router baseline.

The pre-gating router is a one-block causal transformer over token ids with its own embedding,
so it never sees the backbone's hidden states: a token's expert is known for every layer as soon
as the token id exists. It is built as a one-layer `LlamaConfig` whose head emits E logits, so it
reuses `llama.forward` (RoPE, RMSNorm, GQA, KV cache) unchanged.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from readme_jax.model import llama
from readme_jax.model.config import LlamaConfig, MoEConfig, RouterConfig

Params = dict[str, Any]


def init_router(
    rcfg: RouterConfig,
    cfg: LlamaConfig,
    num_experts: int,
    key: jax.Array,
    backbone_embed_VxD: jax.Array | None = None,
) -> Params:
    """Random router; with `backbone_embed_VxD`, its embedding starts as a fixed random
    projection of the backbone's (so similar tokens start with similar routes)."""
    bcfg = rcfg.backbone(cfg)
    k_body, k_proj, k_head = jax.random.split(key, 3)
    params = llama.init_params(bcfg, k_body)
    if backbone_embed_VxD is not None:
        D = backbone_embed_VxD.shape[1]
        proj_DxR = jax.random.normal(k_proj, (D, rcfg.dim), jnp.float32) / np.sqrt(D)
        emb = backbone_embed_VxD.astype(jnp.float32) @ proj_DxR
        emb = emb / (jnp.std(emb) + 1e-6) * 0.02 * np.sqrt(rcfg.dim)
        params["embed"] = emb.astype(params["embed"].dtype)
    head = 0.02 * jax.random.normal(k_head, (rcfg.dim, num_experts), jnp.float32)
    params["head"] = head.astype(params["embed"].dtype)
    return params


def router_logits(
    rparams: Params,
    tokens_BxS: jax.Array,
    rcfg: RouterConfig,
    cfg: LlamaConfig,
    *,
    segment_ids_BxS: jax.Array | None = None,
    cache: Params | None = None,
    num_new_B: jax.Array | None = None,
) -> tuple[jax.Array, Params | None]:
    """Expert logits [B, S, E] (f32) and the router's updated KV cache."""
    bcfg = rcfg.backbone(cfg)
    h_BxSxR, cache, _ = llama.forward(
        rparams,
        tokens_BxS,
        bcfg,
        segment_ids_BxS=segment_ids_BxS,
        cache=cache,
        num_new_B=num_new_B,
        return_hidden=True,
    )
    logits = jnp.einsum("bsr,re->bse", h_BxSxR, rparams["head"], preferred_element_type=jnp.float32)
    return logits, cache


def init_router_cache(
    rcfg: RouterConfig, cfg: LlamaConfig, batch: int, max_len: int, per_layer: bool = False
) -> Params:
    return llama.init_cache(rcfg.backbone(cfg), batch, max_len, per_layer=per_layer)


def router_param_count(rcfg: RouterConfig, cfg: LlamaConfig, num_experts: int) -> int:
    return rcfg.backbone(cfg).param_count() + rcfg.dim * num_experts


def top_k_routing(
    logits_BxSxE: jax.Array, k: int, gate_scaling: bool
) -> tuple[jax.Array, jax.Array]:
    """(experts [B, S, k] int32, weights [B, S, k]). Without gate scaling every weight is 1,
    as in the official Read-ME code; with it, softmax over the chosen k logits."""
    vals, idx = jax.lax.top_k(logits_BxSxE, k)
    if gate_scaling:
        w = jax.nn.softmax(vals, axis=-1)
    else:
        w = jnp.ones_like(vals)
    return idx.astype(jnp.int32), w.astype(jnp.float32)


def init_layerwise_gates(cfg: LlamaConfig, num_experts: int, key: jax.Array) -> jax.Array:
    """Layer-wise baseline: one linear gate per layer on that layer's FFN input, [L, D, E]."""
    w = 0.02 * jax.random.normal(key, (cfg.n_layers, cfg.dim, num_experts), jnp.float32)
    return w.astype(jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32)


class Router(nnx.Module):
    """Flax NNX pre-gating router: holds the router's parameter tree (`init_router`) as
    nnx.Param leaves and calls `router_logits` and `top_k_routing`, so it can sit inside a
    user's own Flax model and still go through nnx.split / nnx.merge for jit.

    `router(tokens_BxS)` -> (logits [B, S, E] f32, (experts [B, S, A] int32, weights [B, S, A]
    f32)), A = mcfg.top_k. Without `params`, a random router (`init_router`, key from
    `rngs.params()`; `backbone_embed_VxD` as there). Raises ConfigError (llama.check_params)
    when `params` disagree with the configs."""

    def __init__(
        self,
        rcfg: RouterConfig,
        cfg: LlamaConfig,
        mcfg: MoEConfig,
        params: Params | None = None,
        *,
        rngs: nnx.Rngs | None = None,
        backbone_embed_VxD: jax.Array | None = None,
    ):
        self.rcfg, self.cfg, self.mcfg = rcfg, cfg, mcfg
        if params is None:
            key = (rngs or nnx.Rngs(0)).params()
            params = init_router(rcfg, cfg, mcfg.num_experts, key, backbone_embed_VxD)
        llama.check_params(rcfg.backbone(cfg), {k: v for k, v in params.items() if k != "head"})
        chex.assert_shape(params["head"], (rcfg.dim, mcfg.num_experts))
        self.weights = nnx.data(jax.tree.map(nnx.Param, params))

    @property
    def params(self) -> Params:
        """The parameter tree as plain arrays (what `router_logits` takes)."""
        return jax.tree.map(
            lambda p: p[...], self.weights, is_leaf=lambda x: isinstance(x, nnx.Param)
        )

    def __call__(
        self, tokens_BxS: jax.Array, *, segment_ids_BxS: jax.Array | None = None
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        chex.assert_rank(tokens_BxS, 2)
        logits, _ = router_logits(
            self.params, tokens_BxS, self.rcfg, self.cfg, segment_ids_BxS=segment_ids_BxS
        )
        return logits, top_k_routing(logits, self.mcfg.top_k, self.mcfg.gate_scaling)
