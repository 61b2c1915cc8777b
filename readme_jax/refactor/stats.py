"""Activation statistics: mean |silu(x W_gate) * (x W_up)| per layer and FFN channel.

This is the input of down_proj; Read-ME keeps the channels a domain uses most (section 1.1).
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

from readme_jax.model import llama
from readme_jax.model.config import LlamaConfig


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


@dataclasses.dataclass
class ActivationStats:
    """Mean |act| per domain: [E, L, F], plus the recipe that produced it."""

    domains: list[str]
    mean_abs_ExLxF: np.ndarray
    n_tokens: list[int]
    recipe: dict[str, Any]

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        np.save(path / "mean_abs.npy", self.mean_abs_ExLxF)
        meta = {"domains": self.domains, "n_tokens": self.n_tokens, "recipe": self.recipe}
        (path / "stats.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, path: str | Path) -> ActivationStats:
        path = Path(path)
        meta = json.loads((path / "stats.json").read_text())
        return cls(
            meta["domains"], np.load(path / "mean_abs.npy"), meta["n_tokens"], meta["recipe"]
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
) -> ActivationStats:
    """Statistics for every domain, in the dict's order."""
    params = llama.unstack_layers(params) if not cfg.scan_layers else params
    means, counts = [], []
    for name, batches in domain_batches.items():
        m, n = domain_stats(params, cfg, batches, desc=f"calibrate {name}")
        means.append(m)
        counts.append(n)
    return ActivationStats(list(domain_batches), np.stack(means), counts, recipe)
