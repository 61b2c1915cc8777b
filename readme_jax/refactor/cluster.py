"""Experts without domain labels: cluster calibration tokens by their FFN activation patterns.

Each token's feature is its |act| pattern in every layer, compressed by a fixed random projection
per layer (F -> `proj` dims) and L2-normalised; k-means (k-means++ init) splits the tokens into E
clusters; each cluster then plays the role of a domain: its mean |act| per layer and channel feeds
`build_expert_spec` unchanged. Two streaming passes over the calibration batches, no [T, L, F]
array is ever held.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from readme_jax.model import llama
from readme_jax.model.config import LlamaConfig, RouterConfig
from readme_jax.model.router import router_logits
from readme_jax.refactor.stats import ActivationStats, _abs_act_ffn


@partial(jax.jit, static_argnames=("cfg",))
def _features(params, tokens_BxS, proj_LxFxP, cfg: LlamaConfig):
    """Per-token features [B, S, L*P] and |act| [L, B, S, F] is never returned whole."""

    def ffn(lp, x, layer):
        y, a_BxSxF = _abs_act_ffn(lp, x, layer)
        return y, a_BxSxF @ proj_LxFxP[layer]

    f_LxBxSxP = llama.forward(params, tokens_BxS, cfg, ffn=ffn, return_hidden=True)[2]
    f = jnp.moveaxis(f_LxBxSxP, 0, 2).reshape(*tokens_BxS.shape, -1)
    return f / (jnp.linalg.norm(f, axis=-1, keepdims=True) + 1e-6)


@partial(jax.jit, static_argnames=("cfg", "E"))
def _cluster_sums(params, tokens_BxS, mask_BxS, proj_LxFxP, centroids_ExLP, cfg, E):
    """Sum of |act| per cluster [E, L, F] and token counts [E], assigning by nearest centroid."""
    feats = _features(params, tokens_BxS, proj_LxFxP, cfg)
    assign_BxS = jnp.argmax(feats @ centroids_ExLP.T, axis=-1)
    onehot_BxSxE = jax.nn.one_hot(assign_BxS, E) * mask_BxS[..., None]

    def ffn(lp, x, layer):
        y, a_BxSxF = _abs_act_ffn(lp, x, layer)
        return y, jnp.einsum("bsf,bse->ef", a_BxSxF, onehot_BxSxE)

    sums_LxExF = llama.forward(params, tokens_BxS, cfg, ffn=ffn, return_hidden=True)[2]
    return jnp.moveaxis(sums_LxExF, 0, 1), onehot_BxSxE.sum((0, 1))


def _projection(cfg: LlamaConfig, proj: int, seed: int) -> jax.Array:
    """The fixed random projection of each layer's |act| to `proj` dims, [L, F, P]."""
    shape = (cfg.n_layers, cfg.ffn_dim, proj)
    return jax.random.normal(jax.random.key(seed), shape) / np.sqrt(cfg.ffn_dim)


def kmeans(x_NxP: np.ndarray, k: int, seed: int = 0, iters: int = 30) -> np.ndarray:
    """Spherical k-means with k-means++ init; returns unit-norm centroids [k, P]."""
    rng = np.random.default_rng(seed)
    n = len(x_NxP)
    if n < k:
        raise ValueError(f"{n} calibration tokens cannot form {k} clusters")
    cent = [x_NxP[rng.integers(n)]]
    for _ in range(1, k):
        d = 1.0 - np.max(x_NxP @ np.stack(cent).T, axis=1)
        p = np.maximum(d, 0) + 1e-12
        cent.append(x_NxP[rng.choice(n, p=p / p.sum())])
    c = np.stack(cent)
    for _ in range(iters):
        a = np.argmax(x_NxP @ c.T, axis=1)
        for j in range(k):
            members = x_NxP[a == j]
            if len(members):
                v = members.sum(0)
                c[j] = v / (np.linalg.norm(v) + 1e-12)
    return c


def cluster_assign(
    params: Any,
    cfg: LlamaConfig,
    batches: list[np.ndarray],
    num_experts: int,
    proj: int = 8,
    seed: int = 0,
) -> list[np.ndarray]:
    """Each calibration token's k-means cluster ([b, S] per batch, -1 at padding): the same
    features and k-means as `cluster_stats`, for constructions that measure their own per-group
    statistics (refactor/construct.py). Raises ValueError with fewer tokens than clusters."""
    p = llama.unstack_layers(params)
    proj_LxFxP = _projection(cfg, proj, seed)
    feats = []
    for toks in batches:
        toks = np.asarray(toks)
        f = _features(p, jnp.asarray(np.maximum(toks, 0), jnp.int32), proj_LxFxP, cfg)
        feats.append(np.asarray(f))
    cent = kmeans(
        np.concatenate([f[np.asarray(t) >= 0] for f, t in zip(feats, batches, strict=True)]),
        num_experts,
        seed,
    )
    return [
        np.where(np.asarray(t) >= 0, np.argmax(f @ cent.T, axis=-1), -1)
        for f, t in zip(feats, batches, strict=True)
    ]


@partial(jax.jit, static_argnames=("rcfg", "cfg"))
def _router_argmax(rparams, tokens_BxS, rcfg, cfg):
    return jnp.argmax(router_logits(rparams, tokens_BxS, rcfg, cfg)[0], axis=-1)


def router_assign(
    rparams: Any, rcfg: RouterConfig, cfg: LlamaConfig, batches: list[np.ndarray]
) -> list[np.ndarray]:
    """Each calibration token's expert as a trained pre-gating router chooses it ([b, S] per
    batch, -1 at padding): groups a router can reach by construction, for experts rebuilt around
    the router's own partition of the tokens (the construction study's "router" grouping)."""
    out = []
    for toks in batches:
        toks = np.asarray(toks)
        e = _router_argmax(rparams, jnp.asarray(np.maximum(toks, 0), jnp.int32), rcfg, cfg)
        out.append(np.where(toks >= 0, np.asarray(e), -1))
    return out


def chunk_assign(
    params: Any,
    cfg: LlamaConfig,
    batches: list[np.ndarray],
    num_experts: int,
    chunk: int = 128,
    proj: int = 8,
    seed: int = 0,
) -> list[np.ndarray]:
    """Groups of contexts rather than tokens: each calibration row is cut into chunks of `chunk`
    tokens, a chunk's feature is the normalised mean of its tokens' features (those of
    `cluster_assign`), k-means splits the chunks into `num_experts` clusters, and every token
    takes its chunk's cluster ([b, S] per batch, -1 at padding). Raises ValueError with fewer
    chunks than clusters."""
    p = llama.unstack_layers(params)
    proj_LxFxP = _projection(cfg, proj, seed)
    feats, owners = [], []  # one feature per chunk; (batch, row, start) of each chunk
    for i, toks in enumerate(batches):
        toks = np.asarray(toks)
        f = np.asarray(_features(p, jnp.asarray(np.maximum(toks, 0), jnp.int32), proj_LxFxP, cfg))
        for r in range(toks.shape[0]):
            for s0 in range(0, toks.shape[1], chunk):
                valid = toks[r, s0 : s0 + chunk] >= 0
                if valid.any():
                    v = f[r, s0 : s0 + chunk][valid].mean(0)
                    feats.append(v / (np.linalg.norm(v) + 1e-12))
                    owners.append((i, r, s0))
    cent = kmeans(np.stack(feats), num_experts, seed)
    labels = np.argmax(np.stack(feats) @ cent.T, axis=-1)
    out = [np.full(np.shape(t), -1) for t in batches]
    for (i, r, s0), lab in zip(owners, labels, strict=True):
        t = np.asarray(batches[i])[r, s0 : s0 + chunk]
        out[i][r, s0 : s0 + chunk] = np.where(t >= 0, lab, -1)
    return out


def cluster_stats(
    params: Any,
    cfg: LlamaConfig,
    batches: list[np.ndarray],
    num_experts: int,
    recipe: dict[str, Any],
    proj: int = 8,
    seed: int = 0,
) -> ActivationStats:
    """ActivationStats whose "domains" are k-means clusters of the calibration tokens."""
    params = llama.unstack_layers(params)
    proj_LxFxP = _projection(cfg, proj, seed)
    feats = []
    for toks in batches:
        toks = np.asarray(toks)
        f = np.asarray(
            _features(params, jnp.asarray(np.maximum(toks, 0), jnp.int32), proj_LxFxP, cfg)
        )
        feats.append(f[toks >= 0])
    cent = kmeans(np.concatenate(feats), num_experts, seed)
    sums = np.zeros((num_experts, cfg.n_layers, cfg.ffn_dim))
    counts = np.zeros(num_experts)
    for toks in batches:
        toks = np.asarray(toks)
        s, n = _cluster_sums(
            params,
            jnp.asarray(np.maximum(toks, 0), jnp.int32),
            jnp.asarray(toks >= 0, jnp.float32),
            proj_LxFxP,
            jnp.asarray(cent, jnp.float32),
            cfg,
            num_experts,
        )
        sums += np.asarray(s)
        counts += np.asarray(n)
    if (counts == 0).any():
        raise ValueError(
            f"k-means left an empty cluster (sizes {counts.tolist()}); use fewer experts"
        )
    names = [f"cluster{j}" for j in range(num_experts)]
    rec = {
        **recipe,
        "clustering": {
            "method": "spherical k-means",
            "proj_per_layer": proj,
            "seed": seed,
            "sizes": counts.astype(int).tolist(),
        },
    }
    return ActivationStats(names, sums / counts[:, None, None], counts.astype(int).tolist(), rec)
