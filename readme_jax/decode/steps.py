"""One decode step library: the jitted prefill and decode steps of the dense model and Read-ME.

Two drivers use it: the static-batch `decode.generator.Generator` and the serving engine
(`serve/decode.py:SlotDecoder`, `serve/backend.py`). Dimension letters: the glossary in
`model/config.py` (N request slots, Q prefill chunk, M cache length, A experts per token).

A step is `llama.forward` (one loop over `llama.block`) with an FFN; for Read-ME the FFN's
routed-expert weights come from one of two sources, a parameter of every step:
  in-graph  the model's own experts in the decode layout (`decode_layout`: per-layer lists,
            zero padding trimmed, shared + expert fused for top-1), read by `select` dispatch;
  slots     device slot buffers (`OffloadedExpertStore.slots`, a list over L of
            {"gate_up": [C, D, 2, Fe], "down": [C, Fe, D]}) through per-token slot ids.
The Generator and the all-resident engine both run the in-graph source (the same FFN, the same
layout); the engine with C < E experts on device runs the slots.

The Generator can also run Read-ME in the stored layout (`readme_model(..., layout="stacked")`):
the layers as a `lax.scan` over the arrays as loaded ([L, ...], experts zero-padded to the widest),
with a stacked KV cache. It builds no second copy of the backbone, so serving holds the weights
once (a paper-width model on one host); each token reads the padding too.

Engine steps end with an epilogue: sample the next token per row (per-request keys), then route
it, so the host knows every request's next experts before the next step (expert batching and
the Belady cache need them). Their shapes come from the engine's configuration only (N slots,
Q chunk, M context), never from a request.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from readme_jax.errors import UserError
from readme_jax.model import llama, moe, quant, readme
from readme_jax.model.config import ConfigError, LlamaConfig
from readme_jax.model.readme import ReadMEConfig
from readme_jax.model.router import init_router_cache
from readme_jax.model.sampling import sample_rows

Params = dict[str, Any]


class PromptError(UserError, ValueError):
    """A prompt that the model cannot take (too long, empty, out-of-range token ids)."""


def validate_tokens(ids: Sequence[int], vocab_size: int, what: str = "prompt") -> None:
    if len(ids) == 0:
        raise PromptError(f"{what} is empty")
    arr = np.asarray(ids)
    bad = np.flatnonzero((arr < 0) | (arr >= vocab_size))
    if bad.size:
        i = int(bad[0])
        raise PromptError(
            f"{what} has token id {int(arr[i])} at position {i}, outside the vocabulary "
            f"[0, {vocab_size})"
        )


# ----------------------------------------------------------------------------- models


@dataclasses.dataclass(frozen=True)
class DecodeModel:
    """What the Generator needs from a model. step(params, tokens_BxS, cache, num_new_B,
    last_B=None) -> (logits, cache): logits [B, S, V], or [B, 1, V] at positions last_B."""

    cfg: LlamaConfig
    step: Callable[..., tuple[jax.Array, Any]]
    new_cache: Callable[[int, int], Any]
    prepare: Callable[[Any], Any] = llama.unstack_layers  # params -> decode layout (+ quant)


def dense_model(cfg: LlamaConfig, quant_mode: str = "none") -> DecodeModel:
    """The dense Llama; `quant_mode` (model/quant.py QUANT_MODES) converts the matmul weights of
    the decode layout at `prepare`."""
    quant.check_mode(quant_mode)

    def step(params, tokens_BxS, cache, num_new_B, last_B=None):
        logits, cache, _ = llama.forward(
            params, tokens_BxS, cfg, cache=cache, num_new_B=num_new_B, last_B=last_B
        )
        return logits, cache

    # the unrolled decode keeps one KV array per layer (see llama.init_cache)
    per_layer = not cfg.scan_layers
    return DecodeModel(
        cfg,
        step,
        lambda b, m: llama.init_cache(cfg, b, m, per_layer=per_layer),
        lambda p: quant.quantize_params(
            p if cfg.scan_layers else llama.unstack_layers(p), quant_mode
        ),
    )


def decode_layout(rc: ReadMEConfig, params: Params, quant_mode: str = "none") -> Params:
    """{"backbone", "router"} in the decode layout of the in-graph expert source: per-layer
    lists, experts trimmed to their real widths, shared + expert fused for top-1 models; the
    backbone's matmul weights in `quant_mode` (model/quant.py; the router stays f32)."""
    bb = moe.unstack_experts(params["backbone"], trim=True, fuse_shared=rc.moe.top_k == 1)
    return {
        "backbone": quant.quantize_params(bb, quant_mode),
        "router": llama.unstack_layers(params["router"]),
    }


def readme_cache(rc: ReadMEConfig, batch: int, max_len: int, per_layer: bool = True) -> Params:
    """Backbone and router KV caches. per_layer: one backbone array per layer (the unrolled
    decode's layout), else [L, B, M, K, hd] (the stacked layout's scan); the router's is always
    per layer."""
    return {
        "backbone": llama.init_cache(rc.model, batch, max_len, per_layer=per_layer),
        "router": init_router_cache(rc.router, rc.model, batch, max_len, per_layer=True),
    }


def stacked_layout(params: Params, quant_mode: str = "none") -> Params:
    """{"backbone", "router"} for the stacked decode: the backbone's arrays as stored (no copy
    with quant_mode "none"), the small router per layer."""
    return {
        "backbone": quant.quantize_params(params["backbone"], quant_mode),
        "router": llama.unstack_layers(params["router"]),
    }


def backbone(rc: ReadMEConfig, bb: Params, tokens_BxS, cache, routing, num_new_B=None, **kw):
    """The MoE backbone on tokens whose routing (experts [B, S, A], weights [B, S, A]) is
    known. `slots` (keyword) = device slot buffers with routing's experts as slot ids; absent:
    the in-graph experts of `bb` (decode layout). Returns (logits or hidden, cache)."""
    slots = kw.pop("slots", None)
    if slots is None:
        mcfg = dataclasses.replace(rc.moe, dispatch=moe.pick_dispatch(None, "decode"))
        ffn = moe.moe_ffn(mcfg, routing)
    else:
        ffn = slot_ffn(slots, *routing)
    out, cache, _ = llama.forward(
        bb, tokens_BxS, rc.model, cache=cache, num_new_B=num_new_B, ffn=ffn, **kw
    )
    return out, cache


LAYOUTS = ("trimmed", "stacked")


def check_layout(layout: str) -> str:
    """`layout` if it is one of LAYOUTS, else ConfigError."""
    if layout not in LAYOUTS:
        raise ConfigError(f"decode layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    return layout


def readme_model(
    rc: ReadMEConfig, quant_mode: str = "none", layout: str = "trimmed"
) -> DecodeModel:
    """Read-ME for the Generator: each step routes its tokens (the router has its own KV
    cache), then the backbone runs them with the in-graph experts (`quant_mode`: see
    decode_layout).

    layout "trimmed": `decode_layout` (per-layer lists, experts trimmed, shared + expert fused
    for top-1; the fastest step, a second copy of the weights while the stored arrays live);
    "stacked": `stacked_layout` (the stored arrays, the layers as a scan; the weights once, the
    padding read). Both give the same tokens. Raises ConfigError for another layout."""
    quant.check_mode(quant_mode)
    check_layout(layout)

    def step(params, tokens_BxS, cache, num_new_B, last_B=None):
        _, routing, rcache = readme.route(
            params, tokens_BxS, rc, cache=cache["router"], num_new_B=num_new_B
        )
        logits, bcache = backbone(
            rc,
            params["backbone"],
            tokens_BxS,
            cache["backbone"],
            routing,
            num_new_B,
            last_B=last_B,
        )
        return logits, {"backbone": bcache, "router": rcache}

    stacked = layout == "stacked"
    rc = rc.replace(model=rc.model.replace(scan_layers=stacked))
    return DecodeModel(
        rc.model,
        step,
        lambda b, m: readme_cache(rc, b, m, per_layer=not stacked),
        lambda p: stacked_layout(p, quant_mode) if stacked else decode_layout(rc, p, quant_mode),
    )


def slot_ffn(slots_L: list[Params], slot_BxSxA: jax.Array, weights_BxSxA: jax.Array):
    """FFN for `llama.forward`: shared expert + the routed experts read from slot buffers.

    Weight-0 tokens (inactive rows, padding) trigger no expert; per slot, the expert runs only
    when some token uses it (`moe.select_experts`), so only the needed slots are read."""

    def ffn(lp: Params, x_BxSxD: jax.Array, layer: int):
        B, S, D = x_BxSxD.shape
        x_TxD = x_BxSxD.reshape(B * S, D)
        y = _slot_experts(slots_L[layer], x_TxD, slot_BxSxA, weights_BxSxA)
        return (y + moe.shared_ffn(lp, x_TxD)).reshape(B, S, D), None

    return ffn


def _slot_experts(sl: Params, x_TxD, slot_xA, w_xA):
    A = slot_xA.shape[-1]
    return moe.select_experts(
        x_TxD, slot_xA.reshape(-1, A), w_xA.reshape(-1, A), sl["gate_up"], sl["down"]
    )


# ----------------------------------------------------------------------------- cache rows


def cache_row(cache: Params, row: jax.Array, start: jax.Array) -> Params:
    """Row `row` of a per-layer slot cache as a batch-1 cache whose length is reset to `start`."""
    take = lambda a: [jax.lax.dynamic_slice_in_dim(x, row, 1, axis=0) for x in a]
    return {"k": take(cache["k"]), "v": take(cache["v"]), "lengths": start[None]}


def put_row(cache: Params, c1: Params, row: jax.Array) -> Params:
    """`cache` with row `row` replaced by the batch-1 cache `c1`."""
    put = lambda a, x: [
        jax.lax.dynamic_update_slice_in_dim(c, r, row, axis=0) for c, r in zip(a, x, strict=True)
    ]
    lengths = jax.lax.dynamic_update_slice_in_dim(cache["lengths"], c1["lengths"], row, axis=0)
    return {"k": put(cache["k"], c1["k"]), "v": put(cache["v"], c1["v"]), "lengths": lengths}


# ----------------------------------------------------------------------------- epilogue


def _sample(logits_BxV, sp_B, sampled: bool):
    """Next token per row. sampled=False (no row has a temperature): argmax, no sort."""
    if not sampled:
        return jnp.argmax(logits_BxV.astype(jnp.float32), axis=-1).astype(jnp.int32)
    return sample_rows(logits_BxV, *sp_B)


def _route_next(rc, router, tok_B, rcache, n_B):
    """Route the sampled tokens (their router KV counts where n_B is 1): experts, weights [B, A]."""
    _, (e, w), rcache = readme.route(
        {"router": router}, tok_B[:, None], rc, cache=rcache, num_new_B=n_B
    )
    return e[:, 0], w[:, 0], rcache


# ----------------------------------------------------------------------------- engine steps


@flax.struct.dataclass
class SlotState:
    """The request slots' inputs to one decode step (N rows, A experts per token).

    tok_N: int32 [N], each row's last token. exp_NxA: int32 [N, A], that token's experts:
    expert ids for the in-graph source, slot ids for slot buffers. w_NxA: float32 [N, A], its
    routing weights. active_N: bool [N], the rows that decode (the others neither advance
    their caches nor run an expert). sp: per-row sampling (temperature, top_k, top_p, seed,
    count), five arrays [N]."""

    tok_N: jax.Array
    exp_NxA: jax.Array
    w_NxA: jax.Array
    active_N: jax.Array
    sp: tuple


def decode_step(params, slots, cache, rcache, rows: SlotState, *, rc, sampled: bool):
    """One token for every active slot row. params: {"backbone", "router"}; slots: None (the
    in-graph experts, rows.exp_NxA expert ids) or slot buffers (rows.exp_NxA slot ids).
    Returns (next tokens [N], their experts [N, A], weights [N, A], cache, rcache); inactive
    rows do not advance."""
    n_N = rows.active_N.astype(jnp.int32)
    w_NxA = jnp.where(rows.active_N[:, None], rows.w_NxA, 0.0)
    logits, cache = backbone(
        rc,
        params["backbone"],
        rows.tok_N[:, None],
        cache,
        (rows.exp_NxA[:, None], w_NxA[:, None]),
        n_N,
        slots=slots,
    )
    nxt_N = _sample(logits[:, 0], rows.sp, sampled)
    e, w, rcache = _route_next(rc, params["router"], nxt_N, rcache, n_N)
    return nxt_N, e, w, cache, rcache


@flax.struct.dataclass
class PrefillChunk:
    """One prompt chunk of one request slot, as the prefill steps take it.

    row, start, n: int32 scalars (the slot row; the position of the chunk's first token; how
    many of the Q tokens are real). tok_Q: int32 [Q], right-padded. is_last: int32 scalar, 1
    when the chunk ends the prompt (only then do the next token and its router KV count).
    sp: the request's sampling (temperature, top_k, top_p, seed, count), scalars."""

    row: jax.Array
    start: jax.Array
    tok_Q: jax.Array
    n: jax.Array
    is_last: jax.Array
    sp: tuple


@flax.struct.dataclass
class ChunkState:
    """A prefill chunk between the layers of the layer-streamed prefill: hidden states
    x [1, Q, D] and the slot row's KV, k and v lists of L arrays [1, M, K, hd]."""

    x_1xQxD: jax.Array
    k: list
    v: list


def prefill_step(params, slots, cache, rcache, chunk: PrefillChunk, routing, *, rc, sampled: bool):
    """One prompt chunk (every expert it needs on device) in one call: the chunk's tokens at
    positions chunk.start.., the next token sampled and routed. routing: (experts [Q, A],
    weights [Q, A]) of the chunk's tokens, as expert ids (slots None) or slot ids.

    Returns (next token, its experts [A], weights [A], cache, rcache)."""
    c1 = cache_row(cache, chunk.row, chunk.start)
    exp_QxA, w_QxA = routing
    logits, c1 = backbone(
        rc,
        params["backbone"],
        chunk.tok_Q[None],
        c1,
        (exp_QxA[None], w_QxA[None]),
        chunk.n[None],
        slots=slots,
        last_B=(chunk.n - 1)[None],
    )
    return _prefill_epilogue(params["router"], cache, rcache, c1, logits[:, 0], chunk, rc, sampled)


def _prefill_epilogue(router, cache, rcache, c1, logits_1xV, chunk: PrefillChunk, rc, sampled):
    nxt_1 = _sample(logits_1xV, tuple(jnp.asarray(v)[None] for v in chunk.sp), sampled)
    r1 = cache_row(rcache, chunk.row, chunk.start)
    _, _, r1 = readme.route(
        {"router": router}, chunk.tok_Q[None], rc, cache=r1, num_new_B=chunk.n[None]
    )
    e, w, r1 = _route_next(rc, router, nxt_1, r1, chunk.is_last[None].astype(jnp.int32))
    cache, rcache = put_row(cache, c1, chunk.row), put_row(rcache, r1, chunk.row)
    return nxt_1[0], e[0], w[0], cache, rcache


# layer-streamed prefill (experts streamed into C < E slots, layer by layer)


def pf_begin(bb, cache, chunk: PrefillChunk) -> ChunkState:
    """Embed a prefill chunk and cut the slot's KV row out."""
    c1 = cache_row(cache, chunk.row, chunk.start)
    x_QxD = quant.take_rows(bb["embed"], chunk.tok_Q, c1["k"][0].dtype)
    return ChunkState(x_QxD[None], c1["k"], c1["v"])


def chunk_layer(lp, x_1xQxD, k_c, v_c, start, *, rc: ReadMEConfig):
    """`llama.block` for the chunk at positions start + 0..Q-1 with the shared expert as its
    FFN. k_c, v_c: this layer's KV row [1, M, K, hd]. Returns (x, h = the FFN input [Q, D],
    k_c, v_c); the routed experts are added by `pf_experts`, one call per wave."""
    Q, M = x_1xQxD.shape[1], k_c.shape[1]
    ctx = llama.context(rc.model, jnp.zeros((1, Q), jnp.int32), None, None, start[None], M)
    shared = lambda lp, h, layer: (moe.shared_ffn(lp, h[0])[None], h[0])
    upd = lambda k, v: llama.write_kv(k_c, v_c, k, v, ctx)
    x, (k_c, v_c), h_QxD = llama.block(lp, x_1xQxD, ctx, upd, rc.model, shared, None)
    return x, h_QxD, k_c, v_c


def pf_experts(slots_l, x_1xQxD, h_QxD, slot_QxA, w_QxA):
    """Add the routed experts of one wave (weight 0 outside it) from layer slot buffers."""
    y = _slot_experts(slots_l, h_QxD, slot_QxA, w_QxA)
    return x_1xQxD + y[None].astype(x_1xQxD.dtype)


def pf_end(
    bb, router, cache, rcache, state: ChunkState, chunk: PrefillChunk, *, rc: ReadMEConfig, sampled
):
    """Final norm and head at the chunk's last token, then the prefill epilogue (as
    `prefill_step` returns)."""
    cfg = rc.model
    x = llama.rms_norm(state.x_1xQxD, bb["final_norm"], cfg.norm_eps)
    last_1x1xD = jax.lax.dynamic_slice_in_dim(x, chunk.n - 1, 1, axis=1)
    logits_1xV = llama.lm_head(bb, last_1x1xD, cfg)[:, 0]
    c1 = {"k": state.k, "v": state.v, "lengths": (chunk.start + chunk.n)[None]}
    return _prefill_epilogue(router, cache, rcache, c1, logits_1xV, chunk, rc, sampled)


def route_prompt(router, tok_1xS, *, rc: ReadMEConfig):
    """Experts and weights [1, S, A] of prompt tokens (no cache: at arrival)."""
    return readme.route({"router": router}, tok_1xS, rc)[1]


# module-level, so every driver of the same config shares the compiled steps
decode_jit = jax.jit(decode_step, static_argnames=("rc", "sampled"), donate_argnums=(2, 3))
prefill_jit = jax.jit(prefill_step, static_argnames=("rc", "sampled"), donate_argnums=(2, 3))
pf_begin_jit = jax.jit(pf_begin)
chunk_layer_jit = jax.jit(chunk_layer, static_argnames=("rc",), donate_argnums=(2, 3))
pf_experts_jit = jax.jit(pf_experts, donate_argnums=(1,))
pf_end_jit = jax.jit(pf_end, static_argnames=("rc", "sampled"), donate_argnums=(2, 3))
route_prompt_jit = jax.jit(route_prompt, static_argnames=("rc",))
