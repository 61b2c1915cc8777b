"""Activation statistics per layer and FFN channel of h = silu(x W_gate) * (x W_up), the input of
down_proj: mean |h| (Read-ME keeps the channels a domain uses most, section 1.1) and the
activation rate (how often the channel is among a token's own top RATE_TOP_FRAC channels: CMoE's
score, arXiv 2502.04416 section 3.1) and, on request, the OBS score: the output error that
removing the channel leaves once the other channels' down rows are refit (the structured Optimal
Brain Surgeon criterion of ZipLM, Kurtic et al. 2023, section 3, and SlimGPT, Ling et al. 2024),

    obs_j = ||W_down[j]||^2 / [(G / n + lam I)^-1]_jj,    G = h^T h over the group's n tokens,

lam = ridge x the mean diagonal of G / n (the refit's ridge, refactor/reconstruct.py), so that a
channel whose contribution the others can take over scores low even when it is large.
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
def obs_scores(gram_FxF: np.ndarray, n: float, w_down_FxD: np.ndarray, ridge: float) -> np.ndarray:
    """The OBS score of every channel, [F] (module doc): `gram_FxF` = h^T h summed over `n`
    tokens, `w_down_FxD` the dense down projection, `ridge` lam's fraction of the mean diagonal.
    Raises ValueError for n <= 0 or ridge <= 0 (a singular Gram has no inverse)."""
    if n <= 0 or not ridge > 0:
        raise ValueError(f"obs_scores needs n > 0 and ridge > 0, got n={n}, ridge={ridge}")
    a = np.asarray(gram_FxF, np.float64) / n
    d = np.diagonal(a)
    a = a + np.eye(len(a)) * (ridge * max(float(d.mean()), 1e-30))
    inv_diag = np.diagonal(np.linalg.inv(a))
    w2 = np.sum(np.square(np.asarray(w_down_FxD, np.float64)), axis=1)
    return w2 / inv_diag


@dataclasses.dataclass
class GroupStats:
    """Per group e, layer l, channel f: mean |h| and activation rate (share of the group's
    tokens with f among their top `top_frac` channels); n_tokens [E]. obs_ExLxF / obs_LxF: the
    OBS score per group and over all tokens (module doc; None unless requested)."""

    mean_abs_ExLxF: np.ndarray
    rate_ExLxF: np.ndarray
    n_tokens: np.ndarray
    top_frac: float
    obs_ExLxF: np.ndarray | None = None
    obs_LxF: np.ndarray | None = None

    def score(self, kind: str) -> np.ndarray:
        """The score `kind` ("magnitude", "frequency" or "obs") per group: [E, L, F]. Raises
        ValueError for "obs" when the statistics were collected without it."""
        if kind == "obs":
            return self._obs()[0]
        return self.mean_abs_ExLxF if kind == "magnitude" else self.rate_ExLxF

    def pooled(self, kind: str) -> np.ndarray:
        """The score over all tokens: [L, F] (token-weighted over groups; for "obs" the score of
        the pooled Gram, since OBS scores do not add up)."""
        if kind == "obs":
            return self._obs()[1]
        w = self.n_tokens / self.n_tokens.sum()
        return np.einsum("e,elf->lf", w, self.score(kind))

    def _obs(self) -> tuple[np.ndarray, np.ndarray]:
        if self.obs_ExLxF is None or self.obs_LxF is None:
            raise ValueError("these statistics have no OBS score: collect them with obs_ridge")
        return self.obs_ExLxF, self.obs_LxF


@partial(jax.jit, static_argnames=("cfg", "E", "top_frac", "with_h"))
def _layer_group_sums(
    lp, x_BxSxD, groups_BxS, cfg: LlamaConfig, E: int, top_frac: float, with_h: bool = False
):
    """One layer (`llama.block`, the forward's own layer) on its input: (its output, sums over
    each group's tokens of |h| [E, F] and of the top-channel indicator [E, F], and with `with_h`
    h itself [B, S, F] f32, else None); group -1 = not counted."""
    onehot_BxSxE = jax.nn.one_hot(groups_BxS, E)  # -1 -> all zeros

    def ffn(lp, x, layer):
        gu = jnp.einsum("bsd,dgf->bsgf", x, lp["w_gate_up"])
        h = jax.nn.silu(gu[:, :, 0]) * gu[:, :, 1]
        a = jnp.abs(h).astype(jnp.float32)
        top = top_channel_mask(a, top_frac)
        return h @ lp["w_down"], (
            jnp.einsum("bsf,bse->ef", a, onehot_BxSxE),
            jnp.einsum("bsf,bse->ef", top, onehot_BxSxE),
            h.astype(jnp.float32) if with_h else None,
        )

    ctx = llama.context(cfg, groups_BxS)
    x, _, (s_abs, s_top, h) = llama.block(lp, x_BxSxD, ctx, None, cfg, ffn, 0)
    return x, s_abs, s_top, h


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
    obs_ridge: float | None = None,
) -> GroupStats:
    """Stream calibration batches ([b, S] tokens, -1 = padding) with each token's group ([b, S],
    -1 = none) through the dense model, one layer at a time: every batch's residual stream is
    kept and each layer is fetched once (`checkpoints.layers.layer`; stacked, per-layer or read
    from disk), so memory follows one layer. With `obs_ridge`, also the OBS score (module doc)
    per group and pooled: each group's Gram [F, F] f64 is summed over one layer at a time
    ((E + 1) F^2 x 8 bytes; F^2 T multiply-adds per layer). Raises ValueError when a group gets
    no token."""
    L, F = cfg.n_layers, cfg.ffn_dim
    s_abs = np.zeros((num_groups, L, F))
    s_top = np.zeros((num_groups, L, F))
    obs = None if obs_ridge is None else np.zeros((num_groups + 1, L, F))
    n = np.zeros(num_groups)
    gs = []
    xs = []
    for toks, g in zip(batches, groups, strict=True):
        toks = np.asarray(toks)
        g = np.where(toks >= 0, np.asarray(g), -1)
        n += np.bincount(g[g >= 0].ravel(), minlength=num_groups)[:num_groups]
        gs.append(jnp.asarray(g, jnp.int32))
        xs.append(_embed(dense["embed"], jnp.asarray(np.maximum(toks, 0), jnp.int32), cfg))
    if (n == 0).any():
        raise ValueError(f"{desc}: group(s) {np.flatnonzero(n == 0).tolist()} got no token")
    with_h = obs is not None
    for l in tqdm(range(L), desc=desc, leave=False):
        lp = layers.layer(dense, l)
        grams = np.zeros((num_groups, F, F)) if with_h else None
        for i, g in enumerate(gs):
            xs[i], a, t, h = _layer_group_sums(
                lp, xs[i], g, cfg, num_groups, float(top_frac), with_h
            )
            s_abs[:, l] += np.asarray(a, np.float64)
            s_top[:, l] += np.asarray(t, np.float64)
            if grams is not None:
                h_TxF, g_T = np.asarray(h).reshape(-1, F), np.asarray(g).ravel()
                for e in np.unique(g_T[g_T >= 0]):
                    r = h_TxF[g_T == e]
                    grams[e] += r.T @ r
        if grams is not None and obs is not None and obs_ridge is not None:
            w_down = np.asarray(lp["w_down"], np.float32)
            for e in range(num_groups):
                obs[e, l] = obs_scores(grams[e], n[e], w_down, obs_ridge)
            obs[num_groups, l] = obs_scores(grams.sum(0), n.sum(), w_down, obs_ridge)
        del lp, grams
    return GroupStats(
        s_abs / n[:, None, None],
        s_top / n[:, None, None],
        n,
        float(top_frac),
        None if obs is None else obs[:num_groups],
        None if obs is None else obs[num_groups],
    )


@dataclasses.dataclass
class ActivationStats:
    """Per domain (or cluster) e, layer l, channel f: mean |act| [E, L, F] and the activation
    rate [E, L, F] (the share of e's tokens with f among their own top RATE_TOP_FRAC channels;
    None in statistics saved before it existed), the tokens per group, and the recipe that
    produced them; obs_ExLxF / obs_LxF: the OBS score per group and pooled (None unless
    collected with `obs_ridge`)."""

    domains: list[str]
    mean_abs_ExLxF: np.ndarray
    n_tokens: list[int]
    recipe: dict[str, Any]
    rate_ExLxF: np.ndarray | None = None
    obs_ExLxF: np.ndarray | None = None
    obs_LxF: np.ndarray | None = None

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        np.save(path / "mean_abs.npy", self.mean_abs_ExLxF)
        for name, a in (
            ("rate", self.rate_ExLxF),
            ("obs", self.obs_ExLxF),
            ("obs_pooled", self.obs_LxF),
        ):
            if a is not None:
                np.save(path / f"{name}.npy", a)
        meta = {"domains": self.domains, "n_tokens": self.n_tokens, "recipe": self.recipe}
        (path / "stats.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, path: str | Path) -> ActivationStats:
        path = Path(path)
        meta = json.loads((path / "stats.json").read_text())

        def opt(name: str) -> np.ndarray | None:
            return np.load(path / f"{name}.npy") if (path / f"{name}.npy").exists() else None

        return cls(
            meta["domains"],
            np.load(path / "mean_abs.npy"),
            meta["n_tokens"],
            meta["recipe"],
            opt("rate"),
            opt("obs"),
            opt("obs_pooled"),
        )

    @classmethod
    def of(cls, names: list[str], g: GroupStats, recipe: dict[str, Any]) -> ActivationStats:
        """The statistics of `group_stats`' result `g` for groups `names`."""
        n = g.n_tokens.astype(int).tolist()
        return cls(names, g.mean_abs_ExLxF, n, recipe, g.rate_ExLxF, g.obs_ExLxF, g.obs_LxF)

    def has(self, score: str) -> bool:
        """Whether these statistics hold construction score `score`."""
        if score == "obs":
            return self.obs_ExLxF is not None and self.obs_LxF is not None
        return self.rate_ExLxF is not None

    def groups(self) -> GroupStats:
        """Every score per group, for the construction rules (refactor/construct.py). Raises
        ValueError when the activation rate is missing (statistics from an older version)."""
        if self.rate_ExLxF is None:
            raise ValueError("these statistics have no activation rate: recalibrate")
        n = np.asarray(self.n_tokens, np.float64)
        return GroupStats(
            self.mean_abs_ExLxF, self.rate_ExLxF, n, RATE_TOP_FRAC, self.obs_ExLxF, self.obs_LxF
        )


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
    obs_ridge: float | None = None,
) -> ActivationStats:
    """Statistics for every domain, in the dict's order (every score, one pass: `group_stats`;
    the OBS score with `obs_ridge`)."""
    batches, groups = [], []
    for i, bs in enumerate(domain_batches.values()):
        batches += list(bs)
        groups += [np.full(np.shape(b), i) for b in bs]
    n = len(domain_batches)
    g = group_stats(params, cfg, batches, groups, n, desc="calibrate", obs_ridge=obs_ridge)
    return ActivationStats.of(list(domain_batches), g, recipe)
