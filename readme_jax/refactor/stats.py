"""Activation statistics per layer and FFN channel of h = silu(x W_gate) * (x W_up), the input of
down_proj: mean |h| (Read-ME keeps the channels a domain uses most, section 1.1) and the
activation rate (how often the channel is among a token's own top RATE_TOP_FRAC channels: CMoE's
score, arXiv 2502.04416 section 3.1).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from readme_jax.checkpoints import layers
from readme_jax.model import llama, quant
from readme_jax.model.config import LlamaConfig
from readme_jax.refactor.targets import top_channel_mask

# a channel is active for a token when among its top half by |h| (fixed, so one calibration
# serves every remain rate)
RATE_TOP_FRAC = 0.5


def _abs_act_ffn(lp, x_BxSxD, layer):
    gu = jnp.einsum("bsd,dgf->bsgf", x_BxSxD, lp["w_gate_up"])
    h_BxSxF = jax.nn.silu(gu[:, :, 0]) * gu[:, :, 1]
    return h_BxSxF @ lp["w_down"], jnp.abs(h_BxSxF).astype(jnp.float32)


@partial(jax.jit, static_argnames=("cfg",))
def _batch_sum(params, tokens_BxS, mask_BxS, cfg: LlamaConfig):
    """Sum over unmasked tokens of |h| per layer: [L, F] (reduced inside each layer)."""
    m = mask_BxS.astype(jnp.float32)

    def ffn(lp, x, layer):
        y, a_BxSxF = _abs_act_ffn(lp, x, layer)
        return y, jnp.einsum("bsf,bs->f", a_BxSxF, m)

    return llama.forward(params, tokens_BxS, cfg, ffn=ffn, return_hidden=True)[2]


@partial(jax.jit, static_argnames=("cfg",))
def token_activations(params, tokens_BxS, cfg: LlamaConfig):
    """|h| for every token and layer, [L, B, S, F] (for clustering and routing targets)."""
    return llama.forward(params, tokens_BxS, cfg, ffn=_abs_act_ffn, return_hidden=True)[2]


# ---------------------------------------------------------------- statistics per token group
@dataclasses.dataclass
class GroupStats:
    """Per group e, layer l, channel f: mean |h| and activation rate (share of the group's
    tokens with f among their top `top_frac` channels); n_tokens [E]."""

    mean_abs_ExLxF: np.ndarray
    rate_ExLxF: np.ndarray
    n_tokens: np.ndarray
    top_frac: float

    def score(self, kind: str) -> np.ndarray:
        return self.mean_abs_ExLxF if kind == "magnitude" else self.rate_ExLxF

    def pooled(self, kind: str) -> np.ndarray:
        """The score over all tokens (token-weighted over groups): [L, F]."""
        w = self.n_tokens / self.n_tokens.sum()
        return np.einsum("e,elf->lf", w, self.score(kind))


@partial(jax.jit, static_argnames=("cfg", "E", "top_frac"))
def _layer_group_sums(lp, x_BxSxD, groups_BxS, cfg: LlamaConfig, E: int, top_frac: float):
    """One layer (`llama.block`, the forward's own layer) on its input: (its output, sums over
    each group's tokens of |h| [E, F] and of the top-channel indicator [E, F]); group -1 =
    not counted."""
    onehot_BxSxE = jax.nn.one_hot(groups_BxS, E)  # -1 -> all zeros

    def ffn(lp, x, layer):
        gu = jnp.einsum("bsd,dgf->bsgf", x, lp["w_gate_up"])
        h = jax.nn.silu(gu[:, :, 0]) * gu[:, :, 1]
        a = jnp.abs(h).astype(jnp.float32)
        top = top_channel_mask(a, top_frac)
        return h @ lp["w_down"], (
            jnp.einsum("bsf,bse->ef", a, onehot_BxSxE),
            jnp.einsum("bsf,bse->ef", top, onehot_BxSxE),
        )

    ctx = llama.context(cfg, groups_BxS)
    x, _, (s_abs, s_top) = llama.block(lp, x_BxSxD, ctx, None, cfg, ffn, 0)
    return x, s_abs, s_top


@partial(jax.jit, static_argnames=("cfg",))
def _embed(embed_VxD, tokens_BxS, cfg: LlamaConfig):
    return quant.take_rows(embed_VxD, tokens_BxS, llama._dtype(cfg))


def group_stats(
    dense: Any,
    cfg: LlamaConfig,
    batches: list[np.ndarray],
    groups: list[np.ndarray],
    num_groups: int,
    top_frac: float = RATE_TOP_FRAC,
    desc: str = "group statistics",
) -> GroupStats:
    """Stream calibration batches ([b, S] tokens, -1 = padding) with each token's group ([b, S],
    -1 = none) through the dense model, one layer at a time: every batch's residual stream is
    kept and each layer is fetched once (`checkpoints.layers.layer`; stacked, per-layer or read
    from disk), so memory follows one layer. Raises ValueError when a group gets no token."""
    L, F = cfg.n_layers, cfg.ffn_dim
    s_abs = np.zeros((num_groups, L, F))
    s_top = np.zeros((num_groups, L, F))
    n = np.zeros(num_groups)
    gs = []
    xs = []
    for toks, g in zip(batches, groups, strict=True):
        toks = np.asarray(toks)
        g = np.where(toks >= 0, np.asarray(g), -1)
        n += np.bincount(g[g >= 0].ravel(), minlength=num_groups)[:num_groups]
        gs.append(jnp.asarray(g, jnp.int32))
        xs.append(_embed(dense["embed"], jnp.asarray(np.maximum(toks, 0), jnp.int32), cfg))
    for l in tqdm(range(L), desc=desc, leave=False):
        lp = layers.layer(dense, l)
        for i, g in enumerate(gs):
            xs[i], a, t = _layer_group_sums(lp, xs[i], g, cfg, num_groups, float(top_frac))
            s_abs[:, l] += np.asarray(a, np.float64)
            s_top[:, l] += np.asarray(t, np.float64)
        del lp
    if (n == 0).any():
        raise ValueError(f"{desc}: group(s) {np.flatnonzero(n == 0).tolist()} got no token")
    return GroupStats(s_abs / n[:, None, None], s_top / n[:, None, None], n, float(top_frac))


@dataclasses.dataclass
class ActivationStats:
    """Per domain (or cluster) e, layer l, channel f: mean |act| [E, L, F] and the activation
    rate [E, L, F] (the share of e's tokens with f among their own top RATE_TOP_FRAC channels;
    None in statistics saved before it existed), the tokens per group, and the recipe that
    produced them."""

    domains: list[str]
    mean_abs_ExLxF: np.ndarray
    n_tokens: list[int]
    recipe: dict[str, Any]
    rate_ExLxF: np.ndarray | None = None

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        np.save(path / "mean_abs.npy", self.mean_abs_ExLxF)
        if self.rate_ExLxF is not None:
            np.save(path / "rate.npy", self.rate_ExLxF)
        meta = {"domains": self.domains, "n_tokens": self.n_tokens, "recipe": self.recipe}
        (path / "stats.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, path: str | Path) -> ActivationStats:
        path = Path(path)
        meta = json.loads((path / "stats.json").read_text())
        rate = np.load(path / "rate.npy") if (path / "rate.npy").exists() else None
        return cls(
            meta["domains"], np.load(path / "mean_abs.npy"), meta["n_tokens"], meta["recipe"], rate
        )

    def groups(self) -> GroupStats:
        """Both scores per group, for the construction rules (refactor/construct.py). Raises
        ValueError when the activation rate is missing (statistics from an older version)."""
        if self.rate_ExLxF is None:
            raise ValueError("these statistics have no activation rate: recalibrate")
        n = np.asarray(self.n_tokens, np.float64)
        return GroupStats(self.mean_abs_ExLxF, self.rate_ExLxF, n, RATE_TOP_FRAC)


def domain_stats(
    params: Any, cfg: LlamaConfig, batches: Iterable[np.ndarray], desc: str = "calibrate"
) -> tuple[np.ndarray, int]:
    """Stream [B, S] token batches (pad id -1 = masked) and return (mean |act| [L, F], tokens)."""
    total = None
    n = 0
    for toks in tqdm(list(batches), desc=desc, leave=False):
        toks = np.asarray(toks)
        mask = toks >= 0
        s = _batch_sum(
            params, jnp.asarray(np.where(mask, toks, 0), jnp.int32), jnp.asarray(mask), cfg
        )
        total = s if total is None else total + s
        n += int(mask.sum())
    if total is None or n == 0:
        raise ValueError(f"{desc}: no calibration tokens")
    return np.asarray(total) / n, n


def collect_stats(
    params: Any,
    cfg: LlamaConfig,
    domain_batches: dict[str, list[np.ndarray]],
    recipe: dict[str, Any],
) -> ActivationStats:
    """Statistics for every domain, in the dict's order (both scores, one pass: `group_stats`)."""
    batches, groups = [], []
    for i, bs in enumerate(domain_batches.values()):
        batches += list(bs)
        groups += [np.full(np.shape(b), i) for b in bs]
    g = group_stats(params, cfg, batches, groups, len(domain_batches), desc="calibrate")
    return ActivationStats(
        list(domain_batches),
        g.mean_abs_ExLxF,
        g.n_tokens.astype(int).tolist(),
        recipe,
        g.rate_ExLxF,
    )
