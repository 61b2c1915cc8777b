"""Useful FLOPs of a train step (model FLOPs, as in MFU) and the machine's matmul FLOP/s.

Counts are 2 x multiply-adds of the matmuls a step needs: the routed FFN at its active width
(shared + top-k average expert), whatever a dispatch mode actually executes; attention scores
over the full S x S (the implementation does not skip masked blocks).
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

from readme_jax.model.config import LlamaConfig, RouterConfig


@functools.cache
def measure_matmul_flops(n: int = 1024, dtype=jnp.float32, reps: int = 5) -> float:
    """Best-of-reps FLOP/s of an n x n x n matmul on the default device (measured once per
    process)."""
    a = jnp.ones((n, n), dtype)
    b = jnp.ones((n, n), dtype)
    f = jax.jit(lambda a, b: a @ b)
    jax.block_until_ready(f(a, b))
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(f(a, b))
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def _attn_macs(cfg: LlamaConfig) -> int:
    """Per token per layer: q/k/v/o projections."""
    return (
        cfg.dim * (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
        + cfg.n_heads * cfg.head_dim * cfg.dim
    )


def _score_macs(cfg: LlamaConfig, seq_len: int) -> int:
    return 2 * seq_len * cfg.n_heads * cfg.head_dim  # QK^T and PV, per token per layer


def decoder_macs(cfg: LlamaConfig, ffn_width: float, seq_len: int) -> dict[str, float]:
    """Per token: body (attention + FFN at ffn_width), ffn part alone, head."""
    ffn = 3 * cfg.dim * ffn_width
    body = cfg.n_layers * (_attn_macs(cfg) + _score_macs(cfg, seq_len) + ffn)
    return {
        "body": body,
        "ffn": cfg.n_layers * ffn,
        "attn_w": cfg.n_layers * _attn_macs(cfg),
        "head": cfg.dim * cfg.vocab_size,
    }


def step_flops_per_token(
    phase: str,
    kind: str,
    cfg: LlamaConfig,
    teacher_cfg: LlamaConfig,
    active_ffn_width: float,
    seq_len: int,
    expert_params: str = "ffn",
    rcfg: RouterConfig | None = None,
    num_experts: int = 1,
) -> float:
    """Model FLOPs per training token of one step (teacher forward + student forward/backward)."""
    t = decoder_macs(teacher_cfg, teacher_cfg.ffn_dim, seq_len)
    if phase == "router":
        macs = t["body"]
        if kind == "readme":
            r = decoder_macs(rcfg.backbone(teacher_cfg), rcfg.ffn_dim, seq_len)
            macs += 3 * (r["body"] + rcfg.dim * num_experts)
        else:  # layer-wise gates: a student forward, gate gradients are negligible
            macs += decoder_macs(cfg, active_ffn_width, seq_len)["body"]
        return 2.0 * macs
    s = decoder_macs(cfg, active_ffn_width, seq_len)
    trained_w = s["ffn"] if expert_params == "ffn" else s["ffn"] + s["attn_w"]
    macs = t["body"] + t["head"]  # teacher forward with its head
    macs += 2 * s["body"] + trained_w  # student forward, activation grads, weight grads
    macs += 2 * s["head"] + (s["head"] if expert_params != "ffn" else 0)  # fused head
    return 2.0 * macs
