"""Layer-local distillation: an optional first training phase before end-to-end KL.

Each layer's MoE FFN learns to reproduce the dense FFN's output on cached teacher activations:
the dense model runs once over the calibration rows and keeps, per layer, the FFN input u (the
normed hidden state) and output y = FFN_dense(u). Then every layer's FFN parameters are trained
at once with `local_ffn_mse` on minibatches of those cached pairs, each domain's tokens on
its own expert (domain-oracle routing, as at refactoring time). No attention and no LM head run
in this phase, so a token costs ~the FFN's FLOPs only (the SmolLM2 LM head alone is ~1/5 of a
forward); the end-to-end phase then corrects what the layer-local objective cannot see.

Cache memory: 2 x L x T x D floats (SmolLM2, 8,192 tokens: 1.1 GB in f32).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from readme_jax.model import llama
from readme_jax.model.config import LlamaConfig

Params = dict[str, Any]
READ_ME_KEYS = ("shared_gate_up", "shared_down", "expert_gate_up", "expert_down")


@dataclasses.dataclass(frozen=True)
class LocalDistillConfig:
    """steps: optimizer steps (0 = off); tokens: cached tokens per domain (first rows of the
    calibration batches); batch: tokens per domain per step; lr: Adam learning rate."""

    steps: int = 0
    tokens: int = 2048
    batch: int = 256
    lr: float = 1e-4
    seed: int = 0

    @classmethod
    def from_config(cls, c_refactor: Any) -> LocalDistillConfig:
        g = c_refactor.get
        return cls(
            g("local_steps", 0), g("local_tokens", 2048), g("local_batch", 256), g("local_lr", 1e-4)
        )


def _ffn_io(lp, x_BxSxD, layer):
    y, _ = llama.dense_ffn(lp, x_BxSxD, layer)
    return y, (x_BxSxD, y)


@partial(jax.jit, static_argnames=("cfg",))
def teacher_ffn_io(dense: Params, tokens_BxS, cfg: LlamaConfig):
    """(u, y) of every layer's dense FFN, each [L, B, S, D]."""
    return llama.forward(dense, tokens_BxS, cfg, ffn=_ffn_io, return_hidden=True)[2]


def cache_teacher_io(
    dense: Params, cfg: LlamaConfig, domain_rows: Sequence[Sequence[np.ndarray]], tokens: int
) -> tuple[np.ndarray, np.ndarray]:
    """Cached (u, y) [L, E, N, D] from the first `tokens` unmasked tokens of each domain's
    rows (token id -1 = masked). Raises ValueError when a domain has fewer tokens."""
    p = llama.unstack_layers(dense)
    us, ys = [], []
    for rows in domain_rows:
        du, dy, n = [], [], 0
        for b in rows:
            if n >= tokens:
                break
            b = np.asarray(b)
            m = (b >= 0).reshape(-1)
            u, y = teacher_ffn_io(p, jnp.asarray(np.maximum(b, 0), jnp.int32), cfg)
            L, D = u.shape[0], u.shape[-1]
            du.append(np.asarray(u).reshape(L, -1, D)[:, m])
            dy.append(np.asarray(y).reshape(L, -1, D)[:, m])
            n += int(m.sum())
        if n < tokens:
            raise ValueError(f"local distillation: {n} calibration tokens, {tokens} requested")
        us.append(np.concatenate(du, 1)[:, :tokens])
        ys.append(np.concatenate(dy, 1)[:, :tokens])
    return np.stack(us, 1), np.stack(ys, 1)


def _swiglu(u_TxD, gu_Dx2xF, down_FxD):
    g = jnp.einsum("td,dgf->tgf", u_TxD, gu_Dx2xF)
    return (jax.nn.silu(g[:, 0]) * g[:, 1]) @ down_FxD


def readme_ffn_out(lp: Params, u_ExTxD: jax.Array) -> jax.Array:
    """One layer's MoE FFN on [E, T, D] inputs, group e routed to expert e: [E, T, D]."""
    E, T, D = u_ExTxD.shape
    shared = _swiglu(u_ExTxD.reshape(E * T, D), lp["shared_gate_up"], lp["shared_down"])
    routed = jax.vmap(_swiglu)(u_ExTxD, lp["expert_gate_up"], lp["expert_down"])
    return shared.reshape(E, T, D) + routed


def local_ffn_mse(pred_LxTxD: jax.Array, target_LxTxD: jax.Array, mask_T=None) -> jax.Array:
    """Layer-local distillation loss: per layer, the mean over tokens of
    ||student FFN output - dense FFN output||^2, divided by the mean ||dense output||^2 of that
    layer (so every layer weighs the same whatever its output scale), averaged over layers.
    0 exactly when the student FFN reproduces the dense one. mask_T: tokens that count."""
    d = (pred_LxTxD - target_LxTxD).astype(jnp.float32)
    t = target_LxTxD.astype(jnp.float32)
    m = jnp.ones(d.shape[1], jnp.float32) if mask_T is None else mask_T.astype(jnp.float32)
    err = jnp.einsum("ltd,t->l", d * d, m)
    ref = jnp.einsum("ltd,t->l", t * t, m)
    return jnp.mean(err / jnp.maximum(ref, 1e-12))


def local_loss(train: Params, u_LxExTxD, y_LxExTxD) -> jax.Array:
    pred = jax.vmap(readme_ffn_out)(train, u_LxExTxD)
    L, E, T, D = pred.shape
    return local_ffn_mse(pred.reshape(L, E * T, D), y_LxExTxD.reshape(L, E * T, D))


def run_local_distill(
    backbone: Params, u_LxExNxD: np.ndarray, y_LxExNxD: np.ndarray, lc: LocalDistillConfig
) -> tuple[Params, list[float]]:
    """Train the stacked MoE FFN parameters of `backbone` (READ_ME_KEYS of its layers) for
    lc.steps Adam steps on random minibatches of the cache. Returns (backbone, losses)."""
    layers = backbone["layers"]
    train = {k: jnp.asarray(layers[k], jnp.float32) for k in READ_ME_KEYS}
    opt = optax.adam(lc.lr)
    state = opt.init(train)
    u, y = jnp.asarray(u_LxExNxD), jnp.asarray(y_LxExNxD)
    N = u.shape[2]

    @jax.jit
    def step(train, state, u, y, idx):  # the cache is an argument, not a baked-in constant
        loss, g = jax.value_and_grad(local_loss)(train, u[:, :, idx], y[:, :, idx])
        upd, state = opt.update(g, state, train)
        return optax.apply_updates(train, upd), state, loss

    rng = np.random.default_rng(lc.seed)
    hist = []
    for _ in range(lc.steps):
        idx = jnp.asarray(rng.choice(N, size=min(lc.batch, N), replace=False))
        train, state, loss = step(train, state, u, y, idx)
        hist.append(float(loss))
    dt = layers["shared_down"].dtype
    new = {**layers, **{k: v.astype(dt) for k, v in train.items()}}
    return {**backbone, "layers": new}, hist


def at_refactor(
    lc: LocalDistillConfig,
    dense: Params,
    cfg: LlamaConfig,
    params: Params,
    domains: Sequence[str],
    domain_batches: dict[str, Sequence[np.ndarray]],
) -> Params:
    """The refactor step's hook: Read-ME params after lc.steps of layer-local distillation on
    the calibration rows (unchanged when lc.steps == 0). Prints one line of losses and time.
    Raises ValueError for experts without a domain of their own (refactor.clustering): the
    teacher targets are cached per domain, expert e learning from domain e's rows."""
    if lc.steps <= 0:
        return params
    if missing := [d for d in domains if d not in domain_batches]:
        raise ValueError(
            f"layer-local distillation needs one expert per calibration domain, but experts "
            f"{missing} have none (clustered experts?); set refactor.local_steps=0"
        )
    t0 = time.time()
    u, y = cache_teacher_io(dense, cfg, [domain_batches[d] for d in domains], lc.tokens)
    t1 = time.time()
    backbone, hist = run_local_distill(params["backbone"], u, y, lc)
    print(
        f"[local distill] {lc.steps} steps x {lc.batch} tokens x {len(domains)} domains: "
        f"loss {hist[0]:.4f} -> {hist[-1]:.4f}; cache {t1 - t0:.0f}s, train {time.time() - t1:.0f}s"
    )
    return {**params, "backbone": backbone}
