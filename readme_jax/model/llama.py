"""Dense Llama decoder as pure functions over a parameter pytree, plus a thin Flax NNX wrapper.

Parameter tree (layers stacked on a leading L axis):
  embed [V, D]; layers: attn_norm [L, D], wqkv [L, D, H + 2K, hd], wo [L, H, hd, D],
  mlp_norm [L, D], w_gate_up [L, D, 2, F], w_down [L, F, D]; final_norm [D]; lm_head [D, V]
  (absent when embeddings are tied).

q/k use the Hugging Face (rotate-half) RoPE layout. The FFN is pluggable: `forward` takes an
`ffn` callable so the MoE model (moe.py) and the activation statistics (refactor/stats.py) reuse
this exact decoder.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from readme_jax.model import quant
from readme_jax.model.config import ConfigError, LlamaConfig

Params = dict[str, Any]
# ffn(layer_params, x_BxSxD, layer_index) -> (y_BxSxD, aux pytree or None)
FFN = Callable[[Params, jax.Array, Any], tuple[jax.Array, Any]]


def _dtype(cfg: LlamaConfig):
    return jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (y * w.astype(jnp.float32)).astype(x.dtype)


def rope_inv_freq(cfg: LlamaConfig) -> jax.Array:
    """Inverse frequencies [hd/2], scaled by cfg.rope_scaling (llama3, linear, freq_factors)."""
    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    rs = cfg.rope_scaling
    if rs is None:
        return inv
    if rs.rope_type == "linear":  # transformers' linear / llama.cpp's freq_scale = 1/factor
        return inv / rs.factor
    if rs.rope_type == "freq_factors":  # llama.cpp: theta_i / rope_freqs.weight[i]
        return inv / jnp.asarray(rs.freq_factors, jnp.float32)
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / inv
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor
    )
    scaled = jnp.where(wavelen > low_wavelen, inv / rs.factor, inv)
    mid = (1 - smooth) * inv / rs.factor + smooth * inv
    is_mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return jnp.where(is_mid, mid, scaled)


def apply_rope(x_BxSxNxhd: jax.Array, positions_BxS: jax.Array, inv_freq: jax.Array) -> jax.Array:
    ang_BxSxh = positions_BxS[..., None].astype(jnp.float32) * inv_freq
    cos = jnp.cos(ang_BxSxh)[:, :, None, :]
    sin = jnp.sin(ang_BxSxh)[:, :, None, :]
    x = x_BxSxNxhd.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxSxNxhd.dtype)


def attention(q_BxSxHxhd, k_BxMxKxhd, v_BxMxKxhd, mask_BxSxM) -> jax.Array:
    """Grouped-query attention; softmax in f32. Returns [B, S, H, hd]."""
    B, S, H, hd = q_BxSxHxhd.shape
    K = k_BxMxKxhd.shape[2]
    q = q_BxSxHxhd.reshape(B, S, K, H // K, hd)
    s_BxKxGxSxM = jnp.einsum("bskgd,bmkd->bkgsm", q, k_BxMxKxhd, preferred_element_type=jnp.float32)
    s_BxKxGxSxM = s_BxKxGxSxM / math.sqrt(hd)
    s_BxKxGxSxM = jnp.where(mask_BxSxM[:, None, None], s_BxKxGxSxM, -1e30)
    p = jax.nn.softmax(s_BxKxGxSxM, axis=-1).astype(v_BxMxKxhd.dtype)
    o = jnp.einsum("bkgsm,bmkd->bskgd", p, v_BxMxKxhd)
    return o.reshape(B, S, H, hd)


# Causal-block attention (prefill): when a call's cache prefix is empty, query block i is scored
# against keys 0..end of block i only, so the fully masked blocks above the diagonal (and the
# cache positions past the prompt) are never computed, as PyTorch's fused attention skips them.
# With full scores, attention took 30% of a 512-token SmolLM2 prefill on XLA:CPU for 14% of
# its FLOPs (docs/logbook/bytes-per-token.md). CAUSAL_BLOCK is the query block: blocks of 128
# over 512 tokens compute 5/8 of the square; smaller blocks skip more but run more, smaller ops
# (measured in docs/benchmarks.md).
CAUSAL_BLOCK = 128


def causal_block_ends(S: int, M: int, block: int | None = None) -> list[int] | None:
    """Ends of the query blocks of the causal-block path for S new tokens over a cache of M
    positions: blocks of `block` (default CAUSAL_BLOCK), the last one shorter where S does not
    divide. None (the plain path) for S < block, where attention is a small part of the call
    (decode steps, the engine's default 32-token chunks keep a step without a branch), for
    S > M, and for one block over exactly its own keys (nothing to skip)."""
    block = block or CAUSAL_BLOCK
    if S < block or S > M:
        return None
    ends = [*range(block, S, block), S]
    return None if ends == [M] else ends


def blocked_attention(q_BxSxHxhd, k_BxMxKxhd, v_BxMxKxhd, mask_BxSxM, ends: list[int]):
    """`attention` with the queries [ends[i-1], ends[i]) against the keys [0, ends[i]) only.
    Equal to `attention` when every later key is masked for those queries: a causal mask over
    an empty cache prefix."""
    outs, start = [], 0
    for end in ends:
        q, m = q_BxSxHxhd[:, start:end], mask_BxSxM[:, start:end, :end]
        outs.append(attention(q, k_BxMxKxhd[:, :end], v_BxMxKxhd[:, :end], m))
        start = end
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


def attend(q_BxSxHxhd, k_BxMxKxhd, v_BxMxKxhd, ctx: Params) -> jax.Array:
    """The layer's attention over the cache (or the call's own keys): causal blocks when the
    cache prefix is empty in every row (`ctx["prefix_len"]` 0, decided on device, so a chunk
    that continues a prompt takes the plain path in the same compiled step), else `attention`."""
    mask = ctx["mask"]
    ends = None
    if "prefix_len" in ctx:
        ends = causal_block_ends(q_BxSxHxhd.shape[1], k_BxMxKxhd.shape[1])
    if ends is None:
        return attention(q_BxSxHxhd, k_BxMxKxhd, v_BxMxKxhd, mask)
    blocked = lambda q, k, v, m: blocked_attention(q, k, v, m, ends)
    fresh = ctx["prefix_len"] == 0
    return jax.lax.cond(fresh, blocked, attention, q_BxSxHxhd, k_BxMxKxhd, v_BxMxKxhd, mask)


def dense_ffn(lp: Params, x_BxSxD: jax.Array, layer: Any = None) -> tuple[jax.Array, None]:
    """SwiGLU FFN: gate and up as one [D, 2F] matmul, then down [F, D]. Weights may be
    low-bit (`quant.dot`)."""
    D, _, F = lp["w_gate_up"].shape
    B, S, _ = x_BxSxD.shape
    gu_BxSx2xF = quant.dot(x_BxSxD, quant.reshape(lp["w_gate_up"], D, 2 * F)).reshape(B, S, 2, F)
    h_BxSxF = jax.nn.silu(gu_BxSx2xF[:, :, 0]) * gu_BxSx2xF[:, :, 1]
    return quant.dot(h_BxSxF, lp["w_down"]), None


def init_cache(cfg: LlamaConfig, batch: int, max_len: int, dtype=None, per_layer: bool = False):
    """KV cache: k/v [L, B, M, K, hd] and the number of filled positions per row.

    per_layer=True holds k/v as lists of L arrays [B, M, K, hd] instead. The unrolled decode
    uses it: in isolation, 30 in-place updates of a stacked cache each followed by a read of that
    layer's slice took 8.4 ms on XLA:CPU (the slice is copied), per-layer arrays 0.4 ms."""
    dtype = dtype or _dtype(cfg)
    shape = (batch, max_len, cfg.n_kv_heads, cfg.head_dim)
    if per_layer:
        return {
            "k": [jnp.zeros(shape, dtype) for _ in range(cfg.n_layers)],
            "v": [jnp.zeros(shape, dtype) for _ in range(cfg.n_layers)],
            "lengths": jnp.zeros((batch,), jnp.int32),
        }
    return {
        "k": jnp.zeros((cfg.n_layers, *shape), dtype),
        "v": jnp.zeros((cfg.n_layers, *shape), dtype),
        "lengths": jnp.zeros((batch,), jnp.int32),
    }


def is_per_layer(cache: Params) -> bool:
    return isinstance(cache["k"], (list, tuple))


def qkv_proj(h_BxSxD: jax.Array, wqkv_Dx_Nxhd) -> jax.Array:
    """[B, S, H + 2K, hd]: q, k and v as one matmul. Contracted as a 2-D matmul: XLA:CPU runs
    the 3-D einsum form of these projections ~3x slower at batch-1 decode."""
    D, N, hd = wqkv_Dx_Nxhd.shape
    B, S, _ = h_BxSxD.shape
    return quant.dot(h_BxSxD, quant.reshape(wqkv_Dx_Nxhd, D, N * hd)).reshape(B, S, N, hd)


def out_proj(o_BxSxHxhd: jax.Array, wo_HxhdxD) -> jax.Array:
    """[B, S, D] from the attention output, as a 2-D matmul (see qkv_proj)."""
    H, hd, D = wo_HxhdxD.shape
    B, S = o_BxSxHxhd.shape[:2]
    return quant.dot(o_BxSxHxhd.reshape(B, S, H * hd), quant.reshape(wo_HxhdxD, H * hd, D))


def block(lp: Params, x_BxSxD, ctx: Params, kv_update, cfg: LlamaConfig, ffn: FFN, layer):
    """One decoder layer: the only place the layer is written. Every forward (scan or unrolled,
    remat or not), prefill and decode step, including the serving engine's layer-streamed
    prefill, is a loop over it.

    ctx: from `context` (positions, mask, RoPE frequencies, the cache prefix for `attend`).
    kv_update(k, v) writes the new keys and values [B, S, K, hd] into this layer's cache and
    returns the full (k_BxMxKxhd, v_BxMxKxhd) to attend over; None means no cache. Returns
    (x_BxSxD, (k, v), ffn aux)."""
    H, K = cfg.n_heads, cfg.n_kv_heads
    h = rms_norm(x_BxSxD, lp["attn_norm"], cfg.norm_eps)
    qkv = qkv_proj(h, lp["wqkv"])
    q, k, v = qkv[:, :, :H], qkv[:, :, H : H + K], qkv[:, :, H + K :]
    q = apply_rope(q, ctx["positions"], ctx["inv_freq"])
    k = apply_rope(k, ctx["positions"], ctx["inv_freq"])
    k_all, v_all = (k, v) if kv_update is None else kv_update(k, v)
    o = attend(q, k_all, v_all, ctx)
    x = x_BxSxD + out_proj(o, lp["wo"]).astype(x_BxSxD.dtype)
    y, aux = ffn(lp, rms_norm(x, lp["mlp_norm"], cfg.norm_eps), layer)
    return x + y.astype(x.dtype), (k_all, v_all), aux


def context(
    cfg: LlamaConfig,
    tokens_BxS: jax.Array,
    positions_BxS: jax.Array | None = None,
    segment_ids_BxS: jax.Array | None = None,
    lengths_B: jax.Array | None = None,
    cache_len: int | None = None,
) -> Params:
    """What every layer of one call shares: RoPE frequencies, positions [B, S], mask [B, S, S]
    (no cache; causal, within segments) or [B, S, M] (a cache of M positions whose row b holds
    lengths_B[b] tokens: the new tokens sit at lengths_B[b] + 0..S-1)."""
    B, S = tokens_BxS.shape
    ctx: dict[str, Any] = {"inv_freq": rope_inv_freq(cfg)}
    if lengths_B is None:
        idx = jnp.arange(S)
        mask = jnp.broadcast_to(idx[None, :] <= idx[:, None], (B, S, S))
        if segment_ids_BxS is not None:
            mask = mask & (segment_ids_BxS[:, :, None] == segment_ids_BxS[:, None, :])
        pos = positions_BxS if positions_BxS is not None else jnp.broadcast_to(idx, (B, S))
        ctx["positions"] = pos
    else:
        pos = lengths_B[:, None] + jnp.arange(S)[None, :]
        ctx["positions"] = pos if positions_BxS is None else positions_BxS
        mask = jnp.arange(cache_len)[None, None, :] <= pos[:, :, None]
        ctx["write_rows"] = jnp.broadcast_to(jnp.arange(B)[:, None], (B, S))
        ctx["write_cols"] = pos
        ctx["prefix_len"] = jnp.max(lengths_B)  # 0: a prefill into an empty cache (`attend`)
    ctx["mask"] = mask
    return ctx


def write_kv(kc_BxMxKxhd, vc_BxMxKxhd, k_BxSxKxhd, v_BxSxKxhd, ctx: Params):
    """One layer's cache with the new keys/values written at the call's positions (`context`);
    positions past the cache are dropped."""
    rows, cols = ctx["write_rows"], ctx["write_cols"]
    return (
        kc_BxMxKxhd.at[rows, cols].set(k_BxSxKxhd.astype(kc_BxMxKxhd.dtype), mode="drop"),
        vc_BxMxKxhd.at[rows, cols].set(v_BxSxKxhd.astype(vc_BxMxKxhd.dtype), mode="drop"),
    )


def cache_len(cache: Params) -> int:
    """M, the positions a KV cache holds (stacked [L, B, M, K, hd] or per-layer lists)."""
    return cache["k"][0].shape[1] if is_per_layer(cache) else cache["k"].shape[2]


def forward(
    params: Params,
    tokens_BxS: jax.Array,
    cfg: LlamaConfig,
    *,
    positions_BxS: jax.Array | None = None,
    segment_ids_BxS: jax.Array | None = None,
    cache: Params | None = None,
    num_new_B: jax.Array | None = None,
    ffn: FFN = dense_ffn,
    return_hidden: bool = False,
    last_B: jax.Array | None = None,
    remat: bool = False,
) -> tuple[jax.Array, Params | None, Any]:
    """Run the decoder. Returns (logits_BxSxV or hidden_BxSxD, new cache or None, aux [L, ...]).

    One loop over `block`: a `lax.scan` when cfg.scan_layers and the layers (and cache) are
    stacked, else unrolled over the layers (per-layer lists, the decode layout). remat=True
    puts each layer under `jax.checkpoint` (training: only layer inputs are kept for the
    backward pass; attention scores are [B, H, S, S] per layer).

    last_B (one position per row): logits [B, 1, V] of those positions only. A prompt needs only
    its last position's; by parameter count the LM head over all positions is ~1/5 of a SmolLM2
    prefill's FLOPs.

    With a cache, the S new tokens of row b sit at positions lengths[b] + 0..S-1 and the cache
    grows by num_new_B[b] (default S); right-padding beyond num_new is overwritten later.
    """
    lengths = None if cache is None else cache["lengths"]
    M = None if cache is None else cache_len(cache)
    ctx = context(cfg, tokens_BxS, positions_BxS, segment_ids_BxS, lengths, M)
    x = quant.take_rows(params["embed"], tokens_BxS, _dtype(cfg))

    def layer_step(lp, x, layer, kv):
        upd = None if kv is None else (lambda k, v: write_kv(*kv, k, v, ctx))
        x, kv_new, aux = block(lp, x, ctx, upd, cfg, ffn, layer)
        return x, (None if kv is None else kv_new), aux

    step = jax.checkpoint(layer_step, static_argnums=(2,)) if remat else layer_step
    x, new_kv, aux = _layer_loop(params["layers"], x, cache, cfg, layer_step, step, remat)
    new_cache = None
    if cache is not None:
        inc = num_new_B if num_new_B is not None else tokens_BxS.shape[1]
        new_cache = {"k": new_kv[0], "v": new_kv[1], "lengths": cache["lengths"] + inc}
    x = rms_norm(x, params["final_norm"], cfg.norm_eps)
    if return_hidden:
        return x, new_cache, aux
    if last_B is not None:
        x = jnp.take_along_axis(x, last_B[:, None, None], axis=1)
    return lm_head(params, x, cfg), new_cache, aux


def _layer_loop(layers, x, cache, cfg: LlamaConfig, layer_step, step, remat: bool):
    """(x, (k, v) in the cache's layout or None, aux stacked over L): the layers in order."""
    kv = None if cache is None else (cache["k"], cache["v"])
    per_layer = cache is not None and is_per_layer(cache)
    if cfg.scan_layers and not isinstance(layers, list) and not per_layer:
        scan_step = jax.checkpoint(layer_step) if remat else layer_step  # layer is traced here

        def body(x, xs):
            x, kv_l, aux = scan_step(xs[0], x, xs[1], xs[2])
            return x, (kv_l, aux)

        x, (new_kv, aux) = jax.lax.scan(body, x, (layers, jnp.arange(cfg.n_layers), kv))
        return x, new_kv, aux
    L = cfg.n_layers
    lps = layers if isinstance(layers, list) else [_index(layers, i) for i in range(L)]
    if kv is None:
        kvs = [None] * L
    elif per_layer:
        kvs = list(zip(kv[0], kv[1], strict=True))
    else:  # stacked cache in an unrolled loop: per-layer slices, restacked at the end
        kvs = [(kv[0][i], kv[1][i]) for i in range(L)]
    auxs = []
    for i in range(L):
        x, kvs[i], aux = step(lps[i], x, i, kvs[i])
        auxs.append(aux)
    aux = None if auxs[0] is None else jax.tree.map(lambda *a: jnp.stack(a), *auxs)
    if kv is None:
        return x, None, aux
    ks, vs = [k for k, _ in kvs], [v for _, v in kvs]
    return x, ((ks, vs) if per_layer else (jnp.stack(ks), jnp.stack(vs))), aux


def _index(tree, i: int):
    return jax.tree.map(lambda a: a[i], tree)


def lm_head(params: Params, x_BxSxD: jax.Array, cfg: LlamaConfig) -> jax.Array:
    """Logits [B, S, V] in f32 (weights may be low-bit, `quant.dot`)."""
    if cfg.tie_embeddings:  # contract against [V, D] directly: a transposed copy costs 8x here
        return quant.dot(x_BxSxD, params["embed"], contract_w=1, out_dtype=jnp.float32)
    return quant.dot(x_BxSxD, params["lm_head"], out_dtype=jnp.float32)


def unstack_layers(params: Params) -> Params:
    """Layers as a list of per-layer trees. XLA:CPU reads slices of a stacked array inside an
    unrolled decode ~6x slower than separate arrays, so decoding uses this form."""
    layers = params["layers"]
    if isinstance(layers, list):
        return params
    n = jax.tree.leaves(layers)[0].shape[0]
    return {**params, "layers": [jax.tree.map(lambda a, i=i: a[i], layers) for i in range(n)]}


def stack_layers(params: Params) -> Params:
    layers = params["layers"]
    if not isinstance(layers, list):
        return params
    return {**params, "layers": jax.tree.map(lambda *a: jnp.stack(a), *layers)}


def param_shapes(cfg: LlamaConfig) -> dict[str, Any]:
    L, D, F, V, hd = cfg.n_layers, cfg.dim, cfg.ffn_dim, cfg.vocab_size, cfg.head_dim
    H, K = cfg.n_heads, cfg.n_kv_heads
    shapes = {
        "embed": (V, D),
        "layers": {
            "attn_norm": (L, D),
            "wqkv": (L, D, H + 2 * K, hd),
            "wo": (L, H, hd, D),
            "mlp_norm": (L, D),
            "w_gate_up": (L, D, 2, F),
            "w_down": (L, F, D),
        },
        "final_norm": (D,),
    }
    if not cfg.tie_embeddings:
        shapes["lm_head"] = (D, V)
    return shapes


def init_params(cfg: LlamaConfig, key: jax.Array) -> Params:
    """Random init (normal, std 0.02; norms at 1) for tests and from-scratch work."""
    dtype = _dtype(cfg)
    shapes = param_shapes(cfg)
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda s: isinstance(s, tuple))
    keys = jax.random.split(key, len(leaves))
    paths = [
        jax.tree_util.keystr(p)
        for p, _ in jax.tree_util.tree_flatten_with_path(
            shapes, is_leaf=lambda s: isinstance(s, tuple)
        )[0]
    ]
    out = []
    for k, shape, path in zip(keys, leaves, paths, strict=True):
        if "norm" in path:
            out.append(jnp.ones(shape, dtype))
        else:
            out.append((0.02 * jax.random.normal(k, shape, jnp.float32)).astype(dtype))
    return jax.tree.unflatten(treedef, out)


def check_params(cfg: LlamaConfig, params: Params) -> None:
    """Raise ConfigError naming the first tensor whose shape disagrees with the config."""
    want = param_shapes(cfg)
    flat_want = dict(
        jax.tree_util.tree_flatten_with_path(want, is_leaf=lambda s: isinstance(s, tuple))[0]
    )
    flat_have = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    for path, shape in flat_want.items():
        if path not in flat_have:
            raise ConfigError(f"parameter {jax.tree_util.keystr(path)} is missing")
        if tuple(flat_have[path].shape) != tuple(shape):
            raise ConfigError(
                f"parameter {jax.tree_util.keystr(path)} has shape "
                f"{tuple(flat_have[path].shape)} but the config implies {tuple(shape)}"
            )


class Llama(nnx.Module):
    """Flax NNX wrapper: holds the parameter tree as nnx.Param leaves; calls `forward`."""

    def __init__(
        self, cfg: LlamaConfig, params: Params | None = None, *, rngs: nnx.Rngs | None = None
    ):
        self.cfg = cfg
        if params is None:
            rngs = rngs or nnx.Rngs(0)
            params = init_params(cfg, rngs.params())
        check_params(cfg, params)
        self.weights = nnx.data(jax.tree.map(nnx.Param, params))

    @property
    def params(self) -> Params:
        return jax.tree.map(
            lambda p: p[...], self.weights, is_leaf=lambda x: isinstance(x, nnx.Param)
        )

    def __call__(self, tokens_BxS: jax.Array, **kw) -> jax.Array:
        logits, _, _ = forward(self.params, tokens_BxS, self.cfg, **kw)
        return logits
