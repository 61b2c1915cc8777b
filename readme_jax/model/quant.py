"""Low-bit weights for inference: int8 with per-output-channel scales (Qwix) and bf16.

Modes (`QUANT_MODES`), applied to a parameter tree by `quantize_params` (any layout: stacked
[L, ...] or the per-layer decode lists; dense, Read-ME backbone and experts alike):
  "none"       f32 weights, plain dots.
  "bf16"       weights stored bf16; each matmul casts its input to bf16 and accumulates in f32
               (XLA:CPU would otherwise convert the whole weight to f32 before the dot).
  "int8"       weight-only int8: `qwix.quantize` per output channel (absmax, symmetric); the
               matmul is `digits_dot`, an int8 dot that streams the int8 weight with the input
               kept to ~15 bits. The form to serve.
  "int8_qwix"  the same int8 weights through `qwix.dot_general` (the weight dequantized, then a
               float dot): identical numerics up to f32 rounding, but XLA:CPU materialises the
               f32 weight every step (slower than f32; docs/benchmarks.md).
  "int8_act"   the same weights with each matmul input quantized to int8 per token (row) at run
               time, Qwix's int8 x int8 path (w8a8, as llama.cpp and XNNPACK do on CPUs):
               fastest, but 8-bit inputs cost perplexity here (docs/results.md).

What is quantized: the matmul weights (`WEIGHT_AXES`: q/k/v, o, gate/up, down of the dense FFN,
the shared, private and fused experts, the untied LM head and the tied embedding). Norms and the
pre-gating router stay f32. The embedding is quantized per vocabulary row, which is both the LM
head's output channel and the unit an embedding lookup reads (`take_rows`).

Our own code is what Qwix does not provide: `QWeight` (a QArray plus how its matmuls treat their
input, so one tree tells every matmul how to run), `digits_dot` (why: its docstring) and the 2-D
contraction helpers that the decoder's reshaped projections need.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import qwix

from readme_jax.model.config import ConfigError

QUANT_MODES = ("none", "bf16", "int8", "int8_qwix", "int8_act")

# parameter name -> number of leading axes of the weight's trailing block that are contracted
# (the matmul input axes); the axes after them are output channels and each gets a scale. Leading
# axes before the block ([L] of a stacked tree, [E] of stacked experts) get scales too.
WEIGHT_AXES = {
    "wqkv": (3, 1),  # [D, N, hd]: block of 3 axes, the first 1 contracted
    "wo": (3, 2),  # [H, hd, D]
    "w_gate_up": (3, 1),  # [D, 2, F]
    "w_down": (2, 1),  # [F, D]
    "shared_gate_up": (3, 1),
    "shared_down": (2, 1),
    "expert_gate_up": (3, 1),
    "expert_down": (2, 1),
    "fused_gate_up": (3, 1),
    "fused_down": (2, 1),
    "lm_head": (2, 1),  # [D, V]
    "embed": (2, -1),  # [V, D]: contracted over its last axis (tied head), scale per row V
}


@flax.struct.dataclass
class QWeight:
    """An int8 weight: `q` (qwix.QArray: int8 values, f32 scales that broadcast over the
    contracted axes) and how a matmul treats its input: "float" (Qwix dequantizes the weight,
    a float dot), "digits" (`digits_dot`) or "int8" (the input quantized per row, Qwix's int8
    dot)."""

    q: qwix.QArray
    lhs: str = flax.struct.field(pytree_node=False, default="digits")

    @property
    def shape(self) -> tuple[int, ...]:
        return self.q.shape

    # a stacked weight ([E, ...] or [C, ...] slot buffers) indexes along its leading axis like
    # an array, so the MoE dispatch reads int8 experts and f32 ones alike
    def __getitem__(self, idx) -> QWeight:
        return QWeight(self.q[idx], self.lhs)

    def __len__(self) -> int:
        return self.shape[0]

    def __iter__(self):
        return (self[i] for i in range(len(self)))


_LHS = {"int8": "digits", "int8_qwix": "float", "int8_act": "int8"}


def check_mode(quant: str) -> str:
    """`quant` if it is one of QUANT_MODES, else ConfigError saying which are."""
    if quant not in QUANT_MODES:
        raise ConfigError(f"quant={quant!r} is not one of {', '.join(QUANT_MODES)}")
    return quant


def quantize_weight(w: jax.Array, n_block: int, n_contract: int, quant: str):
    """One weight in mode `quant` (see the module docstring). The weight's last `n_block` axes
    are one matmul's weight; of those the first `n_contract` are contracted (-1: the last one).
    Channelwise scales on every other axis."""
    if quant == "none":
        return w
    if quant == "bf16":
        return w.astype(jnp.bfloat16)
    nd = w.ndim
    first = nd - n_block
    contracted = {nd - 1} if n_contract < 0 else set(range(first, first + n_contract))
    axes = tuple(a for a in range(nd) if a not in contracted)
    q = qwix.quantize(jnp.asarray(w, jnp.float32), jnp.int8, channelwise_axes=axes)
    return QWeight(q, _LHS[quant])


# the host experts of the serving engine (serve/decode.py ServeParams.experts): leaves
# [E, L, ...], contracted as their in-graph counterparts
EXPERT_AXES = {"gate_up": WEIGHT_AXES["expert_gate_up"], "down": WEIGHT_AXES["expert_down"]}


def quantize_experts(experts: dict[str, Any], quant: str) -> dict[str, Any]:
    """Host experts {"gate_up": [E, L, D, 2, F], "down": [E, L, F, D]} in mode `quant`, as
    NumPy leaves: int8 values with f32 scales per expert, layer and output channel (the same
    numbers as the unfused in-graph experts), or bf16. The form an offload store holds and
    moves. Quantized one expert at a time, so the f32 tree is never copied whole."""
    check_mode(quant)
    if quant == "none":
        return experts
    out = {}
    for key, w in experts.items():
        n_block, n_contract = EXPERT_AXES[key]
        parts = [
            quantize_weight(jnp.asarray(w[e]), n_block, n_contract, quant) for e in range(len(w))
        ]
        out[key] = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *parts)
    return out


def quantize_params(params: Any, quant: str) -> Any:
    """The tree with every matmul weight (WEIGHT_AXES keys, at any depth, in lists too) in mode
    `quant`. Idempotent on already converted leaves. Raises ConfigError for an unknown mode."""
    check_mode(quant)
    if quant == "none":
        return params

    def walk(node, key=None):
        if isinstance(node, dict):
            return {k: walk(v, k) for k, v in node.items()}
        if isinstance(node, list | tuple):
            return type(node)(walk(v, key) for v in node)
        if key in WEIGHT_AXES and not isinstance(node, QWeight):
            return quantize_weight(node, *WEIGHT_AXES[key], quant)
        return node

    return walk(params)


def dequantize(w) -> jax.Array:
    """f32 array of a QWeight (or the array itself)."""
    return qwix.dequantize(w.q) if isinstance(w, QWeight) else w


def reshape(w, *shape: int):
    """w reshaped (a QWeight: values and scales together; channel axes must stay whole)."""
    if isinstance(w, QWeight):
        return QWeight(w.q.reshape(*shape), w.lhs)
    return w.reshape(*shape)


def dot(x: jax.Array, w, contract_w: int = 0, out_dtype=None) -> jax.Array:
    """x [..., I] contracted with the 2-D weight w ([I, O], or [O, I] with contract_w=1) ->
    [..., O] in `out_dtype` (default x's dtype); f32 accumulation for low-bit weights. w: an
    array (f32 or bf16) or a QWeight."""
    out_dtype = out_dtype or x.dtype
    lead = x.shape[:-1]
    x_RxI = x.reshape(-1, x.shape[-1])
    dims = (((1,), (contract_w,)), ((), ()))
    if isinstance(w, QWeight) and w.lhs == "digits":
        y = digits_dot(x_RxI.astype(jnp.float32), w.q, contract_w)
    elif isinstance(w, QWeight):
        lhs = x_RxI
        if w.lhs == "int8":  # per-row scales: one per token
            lhs = qwix.quantize(x_RxI, jnp.int8, channelwise_axes=(0,))
        y = qwix.dot_general(lhs, w.q, dims, preferred_element_type=jnp.float32)
    elif w.dtype != x.dtype:  # bf16 weights: bf16 inputs, f32 accumulation
        # one row is padded to two: XLA:CPU's bf16 matrix-vector path ran ~2.5x slower than
        # its two-row matmul (10 [576, 3072] weights: 10.8 vs 4.3 ms)
        xb = x_RxI.astype(w.dtype)
        xb = jnp.concatenate([xb, xb]) if xb.shape[0] == 1 else xb
        y = jax.lax.dot_general(xb, w, dims, preferred_element_type=jnp.float32)[: x_RxI.shape[0]]
    else:
        pet = None if out_dtype == x.dtype else out_dtype
        y = jax.lax.dot_general(x_RxI, w, dims, preferred_element_type=pet)
    return y.astype(out_dtype).reshape(*lead, y.shape[-1])


DIGIT = 256  # the base of the two int8 digits of a matmul input
_FULL = 127 * DIGIT  # |x| of a row's largest entry, in units of its step


def digits_dot(x_RxI: jax.Array, q: qwix.QArray, contract_w: int = 0) -> jax.Array:
    """x [R, I] f32 times an int8 QArray [I, O] (or [O, I], contract_w=1) -> [R, O] f32, with
    the weight streamed as int8 and no float copy of it.

    Each row of x is rounded to an integer of 15 bits (step = the row's max |x| / 32512) and
    written as hi * 256 + lo with int8 digits hi, lo; one int8 x int8 -> int32 dot over the 2R
    digit rows reads the weight once, and y = (256 acc_hi + acc_lo) * step * weight scale. The
    input's rounding error is at most step / 2 = max|x| / 65024 per entry, below bf16's, so the
    result is the int8 weight's product to about f32 matmul accuracy (tests/model/test_quant.py).

    Our own code: Qwix (0.1.8) runs a float input against an int8 weight by dequantizing the
    weight first (`qwix.dot_general`'s slow path), which XLA:CPU does not fuse into the dot: it
    writes the f32 weight every step (docs/benchmarks.md); its int8 path quantizes the input to
    8 bits, which costs perplexity (docs/results.md)."""
    R = x_RxI.shape[0]
    step_R = jnp.max(jnp.abs(x_RxI), axis=1) / _FULL
    step_R = jnp.where(step_R > 0, step_R, 1.0)
    xq = jnp.round(x_RxI / step_R[:, None]).astype(jnp.int32)  # |xq| <= 32512
    hi = jnp.floor_divide(xq + DIGIT // 2, DIGIT)  # in [-127, 127]
    lo = xq - hi * DIGIT  # in [-128, 127]
    digits = jnp.concatenate([hi, lo]).astype(jnp.int8)
    dims = (((1,), (contract_w,)), ((), ()))
    acc = jax.lax.dot_general(digits, q.qvalue, dims, preferred_element_type=jnp.int32)
    acc = acc.astype(jnp.float32)
    scale_O = q.scale.reshape(-1)  # the weight's per-output-channel scales
    return (acc[:R] * DIGIT + acc[R:]) * step_R[:, None] * scale_O


def take_rows(w, idx, dtype=jnp.float32) -> jax.Array:
    """Rows w[idx] in `dtype` (the embedding lookup): a QWeight's int8 rows times their scales."""
    if isinstance(w, QWeight):
        return qwix.dequantize(w.q[idx]).astype(dtype)
    return w[idx].astype(dtype)


def weight_bytes(tree) -> int:
    """Bytes of every array in a tree (QWeight: its int8 values and f32 scales)."""
    return int(sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree)))
