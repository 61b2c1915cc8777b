"""Read-ME MoE decoder: the Llama backbone with FFN = always-on shared expert + routed experts.

MoE layer parameters replace `w_gate_up`/`w_down` with
  shared_gate_up [L, D, 2, Fs], shared_down [L, Fs, D],
  expert_gate_up [L, E, D, 2, Fe], expert_down [L, E, Fe, D]
(zero-padded widths: silu(0) * 0 = 0, so padding is exact), and for the layer-wise baseline a
gate [L, D, E]. One routing decision per token (experts [B, S, A], weights [B, S, A]) holds in
every layer (Read-ME); the layer-wise baseline instead routes per layer from the hidden state.

Dispatch modes (`pick_dispatch` chooses one from the backend and the phase):
  ragged  sort tokens by expert, grouped matmul with `jax.lax.ragged_dot` (GPU/TPU grouped GEMM;
          on XLA:CPU it lowers to a masked dense product over all experts). Expert parallelism.
  blocked tokens sorted by expert into blocks of one expert each (groups zero-padded to the block
          size), ~T + E * block rows instead of E * T. Two read strategies: `gather` (one
          batched matmul with each block's expert weights gathered; differentiable and fast
          backward: CPU training, a SmolLM2-sized MoE FFN forward+backward of 1,024 tokens, 4
          experts, measured ~2x faster than ragged) and `switch` (each block run by one
          `lax.switch`, weights read in place, padding blocks skipped: the fastest CPU
          forward, used for prompts).
  select  per expert, `lax.cond` on whether any token uses it: reads only the needed experts'
          bytes, which is what makes batch-1 decode faster than dense on CPU; above
          SELECT_SWITCH_MIN (token, expert) pairs (a prompt) blocked with the switch read.
The reference (every expert on every token, masked) lives with the tests (tests/moe_reference.py).
Expert parallelism: `shard_map` over the `expert` mesh axis; tokens replicated, each shard runs
its local experts with ragged_dot, results combined with `psum`.
"""

from __future__ import annotations

import math
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from readme_jax.model import llama, quant
from readme_jax.model.config import DISPATCH_MODES as DISPATCH_MODES  # moe.DISPATCH_MODES
from readme_jax.model.config import LlamaConfig, MoEConfig
from readme_jax.model.router import top_k_routing

Params = dict[str, Any]
PHASES = ("train", "eval", "prefill", "decode")
SELECT_SWITCH_MIN = 32  # select: above this many (token, expert) pairs, switched dispatch


def pick_dispatch(
    backend: str | None,
    phase: str,
    num_tokens: int | None = None,
    *,
    model: str = "ragged",
    override: str = "",
) -> str:
    """The one place that decides which MoE dispatch runs.

    backend: `jax.default_backend()` (None: ask JAX); phase: train | eval | prefill | decode;
    num_tokens: T of the call (select itself switches to blocked blocks above
    SELECT_SWITCH_MIN pairs); model: the model config's mode; override: a configured choice
    ("" = the model's, "auto" = the measured choice, or a mode, which wins).
      prefill, decode  select (reads only the used experts: CPU batch-1 decode beats dense)
      train            the model's; with "auto", blocked on CPU (a SmolLM2 expert step 10.4 vs
                       11.9 s per 1,024 tokens against ragged, which XLA:CPU runs over every
                       expert) and the model's (ragged, a grouped GEMM) on GPU/TPU
      eval             blocked on CPU for a ragged model (one SmolLM2 rr-0.5 forward of [4, 512]
                       tokens ~4.9 s against ~6.2 s), the model's elsewhere."""
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    if override not in ("", "auto"):
        return override
    if phase in ("prefill", "decode"):
        return "select"
    cpu = (backend or jax.default_backend()) == "cpu"
    if cpu and model == "ragged" and (phase == "eval" or override == "auto"):
        return "blocked"
    return model


def _swiglu(x_TxD, gu_Dx2xF, down_FxD):
    """One SwiGLU FFN; its weights may be low-bit (model/quant.py)."""
    D, _, F = gu_Dx2xF.shape
    gu_Tx2xF = quant.dot(x_TxD, quant.reshape(gu_Dx2xF, D, 2 * F)).reshape(-1, 2, F)
    return quant.dot(jax.nn.silu(gu_Tx2xF[:, 0]) * gu_Tx2xF[:, 1], down_FxD)


def _switch_swiglu(e, gu_list, down_list, x_TxD):
    """The FFN (gu_list[e], down_list[e]) on x, picked by one `lax.switch` (clamps e)."""
    branches = [
        lambda x, g=g, d=d: _swiglu(x, g, d).astype(x.dtype)
        for g, d in zip(gu_list, down_list, strict=True)
    ]
    return jax.lax.switch(e, branches, x_TxD)


def shared_ffn(lp: Params, x_TxD: jax.Array) -> jax.Array:
    return _swiglu(x_TxD, lp["shared_gate_up"], lp["shared_down"])


def ragged_experts(x_TxD, experts_TxA, weights_TxA, gu_Ex, down_ExFxD, first_expert=0):
    """Tokens sorted by expert, grouped matmuls with ragged_dot. Only experts
    first_expert .. first_expert + E_local - 1 are computed (the rest contribute 0), which is
    how each expert-parallel shard handles its local experts."""
    T, A = experts_TxA.shape
    E_loc, D, _, F = gu_Ex.shape
    local_TA = experts_TxA.reshape(-1) - first_expert
    in_range = (local_TA >= 0) & (local_TA < E_loc)
    key_TA = jnp.where(in_range, local_TA, E_loc)  # out-of-shard tokens sort last
    order = jnp.argsort(key_TA, stable=True)
    tok = order // A
    group_sizes = jnp.bincount(key_TA, length=E_loc + 1)[:E_loc].astype(jnp.int32)
    xs = x_TxD[tok]
    gu = jax.lax.ragged_dot(xs, gu_Ex.reshape(E_loc, D, 2 * F), group_sizes)
    h = jax.nn.silu(gu[:, :F]) * gu[:, F:]
    y = jax.lax.ragged_dot(h.astype(down_ExFxD.dtype), down_ExFxD, group_sizes)
    w = jnp.where(in_range, weights_TxA.reshape(-1), 0.0)[order]
    return jnp.zeros((T, D), y.dtype).at[tok].add(y * w[:, None].astype(y.dtype))


def _block_layout(experts_TxA, E: int, block: int):
    """Rows of the (token, k) pairs sorted by expert, each expert's group zero-padded to a
    multiple of the block size b, so every block holds one expert's rows. Static shapes: N =
    ceil(T*A / b) + E blocks. Returns (b, N, dest [T*A] row of each pair, src [N*b] token of
    each row (T for padding), block_expert [N] (E for an all-padding block))."""
    T, A = experts_TxA.shape
    n = T * A
    b = min(block, max(8, -(-n // E)))
    key = experts_TxA.reshape(-1)
    order = jnp.argsort(key, stable=True)
    sizes = jnp.bincount(key, length=E)
    padded = -(-sizes // b) * b
    ends = jnp.cumsum(padded)
    ks = key[order]
    rank = jnp.arange(n) - (jnp.cumsum(sizes) - sizes)[ks]
    dest = jnp.zeros((n,), jnp.int32).at[order].set((ends - padded)[ks] + rank)
    N = -(-n // b) + E
    src = jnp.full((N * b,), T, jnp.int32).at[dest].set(jnp.arange(n) // A)
    block_expert = jnp.searchsorted(ends, jnp.arange(N) * b, side="right")
    return b, N, dest, src, block_expert


def _gather_blocks(x_TxD, src, N, b):
    D = x_TxD.shape[1]
    return jnp.concatenate([x_TxD, jnp.zeros((1, D), x_TxD.dtype)])[src].reshape(N, b, D)


def _combine_blocks(y_NbxD, dest, weights_TxA):
    T, A = weights_TxA.shape
    y = y_NbxD[dest].reshape(T, A, -1)
    return jnp.sum(y * weights_TxA[..., None].astype(y.dtype), axis=1)


def blocked_experts(
    x_TxD, experts_TxA, weights_TxA, gu_Ex, down_ExFxD, block: int = 128, read: str = "gather"
):
    """Grouped matmul by blocks (see `_block_layout`).

    read="gather": one batched matmul with each block's expert weights gathered (a padding
    block computes zeros); the training path. read="switch": each block run by one
    `lax.switch` over the experts (weights read in place, padding blocks skipped; blocks of
    64): the CPU prefill path, one SmolLM2-sized MoE FFN forward (512 tokens, 4 experts, 70% on
    one) took 11.5 ms against ragged 19.9, gather 14.9 and the dense FFN 17.6. Differentiable,
    but its backward is slow on CPU. With read="switch" gu_Ex/down may be lists of E (trimmed
    experts of different widths)."""
    if read == "switch":
        return _switched(x_TxD, experts_TxA, weights_TxA, gu_Ex, down_ExFxD, min(block, 64))
    E, D, _, F = gu_Ex.shape
    b, N, dest, src, block_expert = _block_layout(experts_TxA, E, block)
    xs = _gather_blocks(x_TxD, src, N, b)
    be = jnp.minimum(block_expert, E - 1)
    gu = jnp.einsum("nbd,ndf->nbf", xs, gu_Ex.reshape(E, D, 2 * F)[be])
    h = (jax.nn.silu(gu[..., :F]) * gu[..., F:]).astype(down_ExFxD.dtype)
    y = jnp.einsum("nbf,nfd->nbd", h, down_ExFxD[be]).reshape(N * b, D)
    return _combine_blocks(y, dest, weights_TxA)


def _switched(x_TxD, experts_TxA, weights_TxA, gu_Ex, down_ExFxD, block: int):
    E = len(gu_Ex) if isinstance(gu_Ex, list) else gu_Ex.shape[0]
    b, N, dest, src, block_expert = _block_layout(experts_TxA, E, block)
    xs = _gather_blocks(x_TxD, src, N, b)
    branches = [
        lambda xb, g=gu_Ex[e], d=down_ExFxD[e]: _swiglu(xb, g, d).astype(xb.dtype) for e in range(E)
    ] + [jnp.zeros_like]
    # a loop over the blocks, not N unrolled switches: the graph (and compile time) stays
    # constant in T (2,048 tokens: compile and first call 0.6 s vs 2.6 s; no slower to run)
    ys = jax.lax.map(lambda a: jax.lax.switch(a[1], branches, a[0]), (xs, block_expert))
    return _combine_blocks(ys.reshape(N * b, -1), dest, weights_TxA)


def select_experts(x_TxD, experts_TxA, weights_TxA, gu_Ex, down_ExFxD):
    """Per expert, run it (on all T tokens) only if some token picked it. Reads only the needed
    experts' weights: the CPU decode path. Above SELECT_SWITCH_MIN (token, expert) pairs (a
    prompt) running each used expert on every token costs up to E times the FLOPs, so the
    tokens go through blocked dispatch with the switch read instead. gu_Ex/down may be stacked
    arrays or lists."""
    E = len(gu_Ex) if isinstance(gu_Ex, list) else gu_Ex.shape[0]
    if experts_TxA.size == 1:  # one token, top-1 (batch-1 decode): one switch, not E conds
        y = _switch_swiglu(experts_TxA[0, 0], list(gu_Ex), list(down_ExFxD), x_TxD)
        return y * weights_TxA.astype(y.dtype)
    if experts_TxA.size > SELECT_SWITCH_MIN:
        return _switched(x_TxD, experts_TxA, weights_TxA, gu_Ex, down_ExFxD, 64)
    out = jnp.zeros_like(x_TxD)
    for e in range(E):
        w_T = jnp.sum(jnp.where(experts_TxA == e, weights_TxA, 0.0), axis=-1)
        out = jax.lax.cond(
            jnp.any(w_T != 0),
            lambda o, e=e, w_T=w_T: (
                o + (_swiglu(x_TxD, gu_Ex[e], down_ExFxD[e]) * w_T[:, None]).astype(o.dtype)
            ),
            lambda o: o,
            out,
        )
    return out


def expert_parallel(fn, mesh, expert_axis: str = "expert"):
    """Wrap ragged dispatch in shard_map over `expert_axis`: expert weights sharded on E; tokens
    sharded over the mesh's other axes (data, fsdp) and replicated over `expert_axis`; each
    shard runs its local experts on its tokens and the partial outputs are summed with psum."""

    def body(x, e, w, gu, down):
        first = jax.lax.axis_index(expert_axis) * gu.shape[0]
        return jax.lax.psum(fn(x, e, w, gu, down, first_expert=first), expert_axis)

    ex = P(expert_axis)
    token_axes = tuple(a for a in mesh.axis_names if a != expert_axis and mesh.shape[a] > 1)
    n_tok_shards = math.prod(mesh.shape[a] for a in token_axes)

    def call(x, e, w, gu, down):
        # tokens not divisible over the token axes (e.g. a decode step): replicate them
        tok = P(token_axes) if token_axes and x.shape[0] % n_tok_shards == 0 else P()
        x, e, w = (_constrain(a, mesh, tok) for a in (x, e, w))
        gu, down = _constrain(gu, mesh, ex), _constrain(down, mesh, ex)
        return jax.shard_map(
            body, mesh=mesh, in_specs=(tok, tok, tok, ex, ex), out_specs=tok, check_vma=False
        )(x, e, w, gu, down)

    return call


def _constrain(a, mesh, spec):
    """Lay `a` out as `spec` says: reshard under Explicit mesh axes, a constraint under Auto."""
    sharding = jax.sharding.NamedSharding(mesh, spec)
    if any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
        return jax.sharding.reshard(a, sharding)
    return jax.lax.with_sharding_constraint(a, sharding)


def moe_ffn(mcfg: MoEConfig, routing=None, mesh=None):
    """The FFN callable for `llama.forward`: shared expert + routed experts.

    routing: (experts_BxSxA, weights_BxSxA) from the pre-gating router (same in every layer);
    None with mcfg.layerwise: route per layer from that layer's normed hidden state.
    aux per layer: the layer-wise gate logits [B, S, E] (None for Read-ME)."""

    def ffn(lp: Params, x_BxSxD: jax.Array, layer: Any):
        B, S, D = x_BxSxD.shape
        x = x_BxSxD.reshape(B * S, D)
        aux = None
        if mcfg.layerwise:
            logits = jnp.einsum(
                "bsd,de->bse", x_BxSxD, lp["gate"], preferred_element_type=jnp.float32
            )
            experts, weights = top_k_routing(logits, mcfg.top_k, mcfg.gate_scaling)
            aux = logits
        else:
            experts, weights = routing
        e_TxA = experts.reshape(B * S, -1)
        w_TxA = weights.reshape(B * S, -1)
        gu, down = lp["expert_gate_up"], lp["expert_down"]
        lists_ok = mcfg.dispatch == "select" and mesh is None
        if isinstance(gu, list) and not lists_ok:
            gu, down = jnp.stack(gu), jnp.stack(down)
        if mcfg.dispatch == "select" and "fused_gate_up" in lp and e_TxA.size == 1:
            # one top-1 token (batch-1 decode; its weight is 1): one switch over E FFNs that
            # each hold the shared channels and one expert's, so a single gate/up and down pair
            y = _switch_swiglu(e_TxA[0, 0], lp["fused_gate_up"], lp["fused_down"], x)
            return y.reshape(B, S, D), aux
        if mesh is not None:
            y = expert_parallel(ragged_experts, mesh)(x, e_TxA, w_TxA, gu, down)
        elif mcfg.dispatch == "ragged":
            y = ragged_experts(x, e_TxA, w_TxA, gu, down)
        elif mcfg.dispatch == "select":
            y = select_experts(x, e_TxA, w_TxA, gu, down)
        else:
            y = blocked_experts(x, e_TxA, w_TxA, gu, down)
        y = y + shared_ffn(lp, x)
        return y.reshape(B, S, D), aux

    return ffn


def moe_forward(
    params: Params,
    tokens_BxS: jax.Array,
    cfg: LlamaConfig,
    mcfg: MoEConfig,
    routing=None,
    *,
    mesh=None,
    **kw,
):
    """`llama.forward` with the MoE FFN. Returns (logits or hidden, cache, aux)."""
    return llama.forward(params, tokens_BxS, cfg, ffn=moe_ffn(mcfg, routing, mesh), **kw)


def unstack_experts(
    params: Params, trim: bool = False, align: int = 1, fuse_shared: bool = False
) -> Params:
    """Decode layout: per-layer trees (see llama.unstack_layers) whose experts are lists of E
    arrays, so the select dispatch reads one expert without slicing a stacked array.

    trim=True also cuts trailing all-zero channels: those of each expert (the zero padding that
    makes the private parts one common width) and those of each layer's shared expert (the zero
    padding that stacks the layers' shared parts, whose widths differ, into one array). Exact;
    the select dispatch then reads only the real channels (rounded up to a multiple of `align`,
    zeros kept; align=64 measured no faster than 1 in the SmolLM2 decode). Trimmed experts
    differ in width, so only the select dispatch takes them. Untrimmed, the SmolLM2 rr-0.5
    model's fused FFNs held 25,412 channels over 30 layers instead of its 23,040 real ones.

    fuse_shared=True (top-1 models) adds `fused_gate_up`/`fused_down`: per expert one FFN that
    holds the shared channels followed by the expert's, which a single top-1 token runs as one
    gate/up and one down matmul instead of two pairs (SmolLM2 batch-1 decode: 35.7 -> 32.1 ms
    per token). It costs E - 1 extra copies of the shared expert in memory; batches of more
    than one token keep using the separate shared and private parts."""
    params = llama.unstack_layers(params)
    layers = []
    for lp in params["layers"]:
        lp = dict(lp)
        for k in ("expert_gate_up", "expert_down"):
            if not isinstance(lp[k], list):
                lp[k] = [lp[k][e] for e in range(lp[k].shape[0])]
        if trim:
            w = _trim_width(lp["shared_gate_up"], lp["shared_down"], align)
            lp["shared_gate_up"] = lp["shared_gate_up"][..., :w]
            lp["shared_down"] = lp["shared_down"][:w]
            gus, downs = [], []
            for gu, down in zip(lp["expert_gate_up"], lp["expert_down"], strict=True):
                w = _trim_width(gu, down, align)
                gus.append(gu[..., :w])
                downs.append(down[:w])
            lp["expert_gate_up"], lp["expert_down"] = gus, downs
        if fuse_shared:
            lp["fused_gate_up"] = [
                jnp.concatenate([lp["shared_gate_up"], g], axis=-1) for g in lp["expert_gate_up"]
            ]
            lp["fused_down"] = [
                jnp.concatenate([lp["shared_down"], d], axis=0) for d in lp["expert_down"]
            ]
        layers.append(lp)
    return {**params, "layers": layers}


def _trim_width(gu_Dx2xF, down_FxD, align: int) -> int:
    return min(-(-real_width(gu_Dx2xF, down_FxD) // align) * align, down_FxD.shape[0])


def real_width(gu_Dx2xF, down_FxD) -> int:
    """1 + the last FFN channel with any nonzero weight (at least 1)."""
    used = np.any(np.asarray(gu_Dx2xF) != 0, axis=(0, 1)) | np.any(np.asarray(down_FxD) != 0, 1)
    nz = np.flatnonzero(used)
    return int(nz[-1]) + 1 if nz.size else 1


def active_param_count(cfg: LlamaConfig, shared_widths_L, expert_widths_LxE, top_k: int = 1):
    """Parameters touched per token: everything but the FFN, plus the shared expert and k
    average experts at their real (unpadded) widths."""
    total_dense = cfg.param_count()
    dense_ffn = cfg.n_layers * 3 * cfg.dim * cfg.ffn_dim
    width = float(jnp.sum(jnp.asarray(shared_widths_L))) + top_k * float(
        jnp.sum(jnp.mean(jnp.asarray(expert_widths_LxE, jnp.float32), axis=-1))
    )
    active_ffn = int(3 * cfg.dim * width)
    return {
        "total_dense": total_dense,
        "active": total_dense - dense_ffn + active_ffn,
        "active_ffn": active_ffn,
        "dense_ffn": dense_ffn,
    }


def init_moe_layer(
    mcfg: MoEConfig, dim: int, shared_width: int, expert_width: int, key: jax.Array, dtype=None
) -> Params:
    """Random MoE FFN parameters of one layer (normal, std 0.02), for tests and from-scratch
    work: shared_gate_up [D, 2, Fs], shared_down [Fs, D], expert_gate_up [E, D, 2, Fe],
    expert_down [E, Fe, D], and with mcfg.layerwise a gate [D, E]."""
    D, Fs, Fe, E = dim, shared_width, expert_width, mcfg.num_experts
    shapes = {
        "shared_gate_up": (D, 2, Fs),
        "shared_down": (Fs, D),
        "expert_gate_up": (E, D, 2, Fe),
        "expert_down": (E, Fe, D),
    }
    if mcfg.layerwise:
        shapes["gate"] = (D, E)
    keys = jax.random.split(key, len(shapes))
    dtype = dtype or jnp.float32
    return {
        name: (0.02 * jax.random.normal(k, shape, jnp.float32)).astype(dtype)
        for k, (name, shape) in zip(keys, shapes.items(), strict=True)
    }


class MoEFFN(nnx.Module):
    """Flax NNX MoE FFN layer: the always-on shared expert plus E routed experts, holding one
    layer's parameters (`init_moe_layer` names and shapes) as nnx.Param leaves and calling
    `moe_ffn`, so it can sit inside a user's own Flax model and still go through nnx.split /
    nnx.merge for jit.

    `ffn(x_BxSxD, routing)` -> y [B, S, D], routing = (experts [B, S, A] int32, weights
    [B, S, A]) from a `Router` (or any router); with mcfg.layerwise, routing=None routes from
    x with the layer's own gate, and `return_aux=True` also returns its logits [B, S, E].
    Without `params`, random ones of widths `shared_width` / `expert_width`."""

    def __init__(
        self,
        mcfg: MoEConfig,
        params: Params | None = None,
        *,
        dim: int | None = None,
        shared_width: int | None = None,
        expert_width: int | None = None,
        rngs: nnx.Rngs | None = None,
        mesh=None,
    ):
        self.mcfg, self.mesh = mcfg, mesh
        if params is None:
            if None in (dim, shared_width, expert_width):
                raise ValueError("MoEFFN needs params, or dim, shared_width and expert_width")
            key = (rngs or nnx.Rngs(0)).params()
            params = init_moe_layer(mcfg, dim, shared_width, expert_width, key)
        D = params["shared_down"].shape[-1]
        chex.assert_shape(params["expert_gate_up"], (mcfg.num_experts, D, 2, None))
        self.weights = nnx.data(jax.tree.map(nnx.Param, params))

    @property
    def params(self) -> Params:
        """One layer's parameters as plain arrays (what `moe_ffn`'s callable takes)."""
        return jax.tree.map(
            lambda p: p[...], self.weights, is_leaf=lambda x: isinstance(x, nnx.Param)
        )

    def __call__(self, x_BxSxD: jax.Array, routing=None, *, return_aux: bool = False):
        chex.assert_shape(x_BxSxD, (None, None, self.params["shared_down"].shape[-1]))
        if routing is None and not self.mcfg.layerwise:
            raise ValueError("MoEFFN needs routing (experts, weights) unless mcfg.layerwise")
        if routing is not None:
            chex.assert_equal_shape(routing)
            chex.assert_shape(routing[0], x_BxSxD.shape[:2] + (self.mcfg.top_k,))
        y, aux = moe_ffn(self.mcfg, routing, self.mesh)(self.params, x_BxSxD, None)
        return (y, aux) if return_aux else y
