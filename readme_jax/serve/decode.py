"""Jitted prefill and decode steps of the Read-ME MoE over a fixed set of request slots.

Dimension letters: N request slots, Q prefill chunk, T context, L layers, D width, E experts,
C expert slots, K experts per token (top-k), V vocab.

The backbone's routed experts are not part of the step's parameters: every step reads them from
an expert slot buffer (`OffloadedExpertStore.slots`, a list over L of {"gate_up": [C, D, 2, Fe],
"down": [C, Fe, D]}) through a per-token slot index that the host maps from the expert cache.
The all-resident server is the same code with C = E slots holding experts 0..E-1.

Steps (both donate the backbone KV cache and the router KV cache):
  prefill  one request, one chunk of at most Q consecutive prompt tokens, shape [1, Q], streamed
           layer by layer (`pf_begin`, L x (`pf_layer`, a `pf_experts` per wave), `pf_end`):
           in every layer the chunk's routed experts run in waves of at most C, each wave's
           layer weights loaded just before it, so a prompt needing more experts than slots
           loads each of its experts once per chunk (the cache's wave model) and the load of
           layer l+1 overlaps the compute of layer l (async dispatch).
  decode   one jitted call over every slot, one token each, shape [N, 1]; inactive rows do not
           advance; a step whose rows need more than C experts runs one call per wave.
Both then sample the next token (per-row temperature / top-k / top-p, per-request key
fold_in(key(seed), index of the token)) and run the router on it at once, so each step returns
the next token *and its expert*: the host knows every request's next expert before the next step.

Exactness: on XLA:CPU a row of a matmul depends on the matmul's shape but not on the other rows
or its position, and shapes here never depend on the batch or the cache: decode is always
[N, 1], prefill [1, Q]; a token's routed expert runs in exactly one wave (top-1; weight 0
elsewhere adds an exact 0); a request's key depends on the request alone. So a request's tokens
do not depend on batching, cache policy, capacity, waves or chunk boundaries (tested bitwise).
With top-k > 1 a token's experts may fall in different waves and the sum order may change.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from readme_jax.model import llama, moe
from readme_jax.model.config import ReadMEConfig
from readme_jax.model.router import router_logits, top_k_routing
from readme_jax.model.sampling import sample

Params = dict[str, Any]
EXPERT_KEYS = ("expert_gate_up", "expert_down")


# ----------------------------------------------------------------------------- parameters


@dataclasses.dataclass
class ServeParams:
    """A Read-ME model split for serving.

    backbone: decode layout (per-layer list) without routed experts or layer-wise gates.
    router: pre-gating router params. experts: host NumPy {"gate_up": [E, L, D, 2, Fe],
    "down": [E, L, Fe, D]}, expert-major so that one expert is one contiguous slice.
    """

    rc: ReadMEConfig
    backbone: Params
    router: Params
    experts: dict[str, np.ndarray]

    @property
    def num_experts(self) -> int:
        return self.experts["gate_up"].shape[0]


def split_params(rc: ReadMEConfig, params: Params) -> ServeParams:
    """{"backbone", "router"} Read-ME params -> `ServeParams` (experts moved to host).

    Works in NumPy (no per-shape compiles), then places the backbone and router on device."""
    if rc.moe.layerwise or "router" not in params:
        raise ValueError("serving needs a pre-gating (router-decoupled) Read-ME model")
    bb = params["backbone"]
    layers = bb["layers"]
    if isinstance(layers, list):
        per_layer = [{k: np.asarray(v) for k, v in lp.items()} for lp in layers]
    else:
        host = {k: np.asarray(v) for k, v in layers.items()}
        per_layer = [{k: v[l] for k, v in host.items()} for l in range(rc.model.n_layers)]
    experts = {
        "gate_up": np.stack([lp["expert_gate_up"] for lp in per_layer], axis=1),  # [E, L, ...]
        "down": np.stack([lp["expert_down"] for lp in per_layer], axis=1),
    }
    keep = [{k: v for k, v in lp.items() if k not in (*EXPERT_KEYS, "gate")} for lp in per_layer]
    backbone = jax.device_put({**{k: v for k, v in bb.items() if k != "layers"}, "layers": keep})
    rc = rc.replace(model=rc.model.replace(scan_layers=False))
    return ServeParams(rc, backbone, jax.device_put(params["router"]), experts)


def resident_slots(experts: dict[str, np.ndarray]) -> list[Params]:
    """All E experts as slot buffers (slot e = expert e): the no-offload layout."""
    L = experts["gate_up"].shape[1]
    dev = jax.devices()[0]  # committed, like the store's slots: the same compiled steps
    return [{k: jax.device_put(v[:, l], dev) for k, v in experts.items()} for l in range(L)]


# ----------------------------------------------------------------------------- pieces


def slot_ffn(slots_L: list[Params], slot_BxSxK: jax.Array, weights_BxSxK: jax.Array):
    """FFN for `llama.forward`: shared expert + the routed experts read from slot buffers.

    Weight-0 tokens (inactive rows, padding) trigger no expert; per slot, the expert runs only
    when some token uses it (`moe.select_experts`), so only the needed slots are read."""

    def ffn(lp: Params, x_BxSxD: jax.Array, layer: int):
        B, S, D = x_BxSxD.shape
        x_TxD = x_BxSxD.reshape(B * S, D)
        sl = slots_L[layer]
        y = moe.select_experts(
            x_TxD,
            slot_BxSxK.reshape(B * S, -1),
            weights_BxSxK.reshape(B * S, -1),
            sl["gate_up"],
            sl["down"],
        )
        return (y + moe.shared_ffn(lp, x_TxD)).reshape(B, S, D), None

    return ffn


def sample_rows(logits_BxV, temp_B, top_k_B, top_p_B, seed_B, count_B) -> jax.Array:
    """Next token per row; row b's randomness is key fold_in(key(seed_b), count_b) alone."""
    greedy = jnp.argmax(logits_BxV.astype(jnp.float32), axis=-1).astype(jnp.int32)

    def sampled(_):
        keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seed_B, count_B)
        one = lambda l, k, t, tk, tp: sample(l[None], k, t[None], tk[None], tp[None])[0]
        return jax.vmap(one)(logits_BxV, keys, temp_B, top_k_B, top_p_B)

    return jax.lax.cond(jnp.any(temp_B > 0), sampled, lambda _: greedy, None)


def _route(router, tok_BxS, rc: ReadMEConfig, rcache, n_B):
    logits, rcache = router_logits(
        router, tok_BxS, rc.router, rc.model, cache=rcache, num_new_B=n_B
    )
    experts, weights = top_k_routing(logits, rc.moe.top_k, rc.moe.gate_scaling)
    return experts, weights, rcache


def _row(cache: Params, row: jax.Array, start: jax.Array) -> Params:
    """Row `row` of a slot cache as a batch-1 cache whose length is reset to `start`."""
    if llama.is_per_layer(cache):  # lists of [N, T, K, hd]
        take = lambda a: [jax.lax.dynamic_slice_in_dim(x, row, 1, axis=0) for x in a]
    else:  # [L, N, T, K, hd]
        take = lambda a: jax.lax.dynamic_slice_in_dim(a, row, 1, axis=1)
    return {"k": take(cache["k"]), "v": take(cache["v"]), "lengths": start[None]}


def _put_row(cache: Params, rc1: Params, row: jax.Array) -> Params:
    if llama.is_per_layer(cache):
        put = lambda a, x: [
            jax.lax.dynamic_update_slice_in_dim(c, r, row, axis=0)
            for c, r in zip(a, x, strict=True)
        ]
    else:
        put = lambda a, x: jax.lax.dynamic_update_slice_in_dim(a, x, row, axis=1)
    lengths = jax.lax.dynamic_update_slice_in_dim(cache["lengths"], rc1["lengths"], row, axis=0)
    return {"k": put(cache["k"], rc1["k"]), "v": put(cache["v"], rc1["v"]), "lengths": lengths}


# ----------------------------------------------------------------------------- steps


def pf_begin(backbone, cache, row, start, tok_Q):
    """Embed a prefill chunk and cut the slot's KV row out: (x [1, Q, D], k, v: lists of L
    arrays [1, T, K, hd])."""
    c1 = _row(cache, row, start)
    return backbone["embed"][tok_Q][None], c1["k"], c1["v"]


def pf_layer(lp, x_1xQxD, k_c, v_c, start, *, rc: ReadMEConfig):
    """One layer's attention and shared expert for the chunk at positions start + 0..Q-1.
    k_c, v_c: this layer's KV row [1, T, K, hd].

    Returns (x with the shared expert added, h = the FFN input, k_c, v_c); the routed experts
    are added by `pf_experts`, one call per wave."""
    cfg = rc.model
    H, K = cfg.n_heads, cfg.n_kv_heads
    Q, T = x_1xQxD.shape[1], k_c.shape[1]
    pos_1xQ = (start + jnp.arange(Q))[None]
    mask_1xQxT = jnp.arange(T)[None, None, :] <= pos_1xQ[:, :, None]
    inv = llama.rope_inv_freq(cfg)
    h = llama.rms_norm(x_1xQxD, lp["attn_norm"], cfg.norm_eps)
    qkv = llama.qkv_proj(h, lp["wqkv"])
    q = llama.apply_rope(qkv[:, :, :H], pos_1xQ, inv)
    k = llama.apply_rope(qkv[:, :, H : H + K], pos_1xQ, inv)
    k_c = k_c.at[0, pos_1xQ[0]].set(k[0].astype(k_c.dtype), mode="drop")
    v_c = v_c.at[0, pos_1xQ[0]].set(qkv[0, :, H + K :].astype(v_c.dtype), mode="drop")
    o = llama.attention(q, k_c, v_c, mask_1xQxT)
    x = x_1xQxD + llama.out_proj(o, lp["wo"])
    h_QxD = llama.rms_norm(x, lp["mlp_norm"], cfg.norm_eps)[0]
    return x + moe.shared_ffn(lp, h_QxD)[None].astype(x.dtype), h_QxD, k_c, v_c


def pf_experts(slots_l, x_1xQxD, h_QxD, slot_QxK, w_QxK):
    """Add the routed experts of one wave (weight 0 outside it) from layer slot buffers."""
    y = moe.select_experts(h_QxD, slot_QxK, w_QxK, slots_l["gate_up"], slots_l["down"])
    return x_1xQxD + y[None].astype(x_1xQxD.dtype)


def pf_end(
    backbone,
    router,
    cache,
    rcache,
    k_c,
    v_c,
    x_1xQxD,
    row,
    start,
    tok_Q,
    n,
    is_last,
    sp_row,
    *,
    rc: ReadMEConfig,
):
    """Final norm, sample the next token, route the chunk and that token, write the rows back.

    Returns (next token, its experts [K], weights [K], cache, rcache); the next token and its
    router KV only count when `is_last` (the chunk ends the prompt)."""
    cfg = rc.model
    x = llama.rms_norm(x_1xQxD, backbone["final_norm"], cfg.norm_eps)
    last_1x1xD = jax.lax.dynamic_slice_in_dim(x, n - 1, 1, axis=1)
    logits_1xV = llama.lm_head(backbone, last_1x1xD, cfg)[:, 0]
    nxt_1 = sample_rows(logits_1xV, *(jnp.asarray(v)[None] for v in sp_row))
    r1 = _row(rcache, row, start)
    _, r1 = router_logits(router, tok_Q[None], rc.router, cfg, cache=r1, num_new_B=n[None])
    experts, weights, r1 = _route(router, nxt_1[:, None], rc, r1, is_last[None])
    c1 = {"k": k_c, "v": v_c, "lengths": (start + n)[None]}
    cache, rcache = _put_row(cache, c1, row), _put_row(rcache, r1, row)
    return nxt_1[0], experts[0, 0], weights[0, 0], cache, rcache


def decode_step(
    backbone,
    router,
    slots,
    cache,
    rcache,
    tok_N,
    slot_NxK,
    w_NxK,
    active_N,
    sp_N,
    *,
    rc: ReadMEConfig,
):
    """One token for every active slot. sp_N: (temperature, top_k, top_p, seed, count) [N].

    Returns (next tokens [N], their experts [N, K], weights [N, K], cache, rcache)."""
    cfg = rc.model
    n_N = active_N.astype(jnp.int32)
    w_NxK = jnp.where(active_N[:, None], w_NxK, 0.0)
    ffn = slot_ffn(slots, slot_NxK[:, None], w_NxK[:, None])
    h_Nx1xD, cache, _ = llama.forward(
        backbone, tok_N[:, None], cfg, cache=cache, num_new_B=n_N, ffn=ffn, return_hidden=True
    )
    nxt_N = sample_rows(llama.lm_head(backbone, h_Nx1xD, cfg)[:, 0], *sp_N)
    experts, weights, rcache = _route(router, nxt_N[:, None], rc, rcache, n_N)
    return nxt_N, experts[:, 0], weights[:, 0], cache, rcache


def route_prompt_fn(router, tok_1xS, *, rc: ReadMEConfig):
    """Experts and weights [1, S, K] of prompt tokens (no cache: at arrival)."""
    logits, _ = router_logits(router, tok_1xS, rc.router, rc.model)
    return top_k_routing(logits, rc.moe.top_k, rc.moe.gate_scaling)


# module-level, so every SlotDecoder of the same config shares the compiled steps
_pf_begin = jax.jit(pf_begin)
_pf_layer = jax.jit(pf_layer, static_argnames=("rc",), donate_argnums=(2, 3))
_pf_experts = jax.jit(pf_experts, donate_argnums=(1,))
_pf_end = jax.jit(pf_end, static_argnames=("rc",), donate_argnums=(2, 3))
_decode_jit = jax.jit(decode_step, static_argnames=("rc",), donate_argnums=(3, 4))
_route_jit = jax.jit(route_prompt_fn, static_argnames=("rc",))

# ----------------------------------------------------------------------------- decoder


class SlotDecoder:
    """Compiled steps over `num_slots` request slots with a context of `max_len` tokens.

    Holds the KV caches; the caller owns the expert slot buffers and the slot index maps."""

    def __init__(self, sp: ServeParams, num_slots: int, max_len: int, prefill_chunk: int = 32):
        cfg = sp.rc.model
        if max_len > cfg.max_seq_len:
            raise ValueError(f"max_len={max_len} exceeds the model context {cfg.max_seq_len}")
        self.sp, self.rc = sp, sp.rc
        self.num_slots, self.max_len, self.chunk = num_slots, max_len, prefill_chunk
        self.top_k = sp.rc.moe.top_k
        self.reset()

    def reset(self) -> None:
        from readme_jax.model.router import init_router_cache

        # committed like the step outputs, so the second call does not recompile
        dev = jax.devices()[0]
        # one KV array per layer, as the unrolled decode of llama.forward prefers (init_cache)
        self.cache = jax.device_put(
            llama.init_cache(self.rc.model, self.num_slots, self.max_len, per_layer=True), dev
        )
        self.rcache = jax.device_put(
            init_router_cache(
                self.rc.router, self.rc.model, self.num_slots, self.max_len, per_layer=True
            ),
            dev,
        )

    def route_prompt(self, tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """(experts [S, K] int, weights [S, K]) of a prompt."""
        S = len(tokens)
        buf = np.zeros((1, self.max_len), np.int32)  # one shape: one compile, one rounding
        buf[0, :S] = tokens
        e, w = _route_jit(self.sp.router, jnp.asarray(buf), rc=self.rc)
        return np.asarray(e)[0, :S], np.asarray(w)[0, :S]  # slice on host: no per-S compile

    def prefill(self, slots, row, start, tokens, waves, is_last, sp_row, load_layer=None):
        """Dispatch one prefill chunk (at most `chunk` tokens) layer by layer.

        slots: the slot buffers (list over L), or a callable layer -> buffer (a store's, read
        after that layer's loads). waves: [(slot_ids [n, K], weights [n, K], loads)], weights 0
        for tokens/experts outside the wave; before a wave's experts run in layer l,
        `load_layer(expert, slot, l)` is called for each (expert, slot) of its `loads`, so the
        load of layer l+1 is dispatched while layer l computes. Returns device (tok, experts,
        weights) of the token after the chunk."""
        n, (Q, K) = len(tokens), (self.chunk, self.top_k)
        if not 1 <= n <= Q:
            raise ValueError(f"a prefill chunk holds 1..{Q} tokens, got {n}")
        slots_at = slots if callable(slots) else slots.__getitem__
        tok = np.zeros(Q, np.int32)
        tok[:n] = tokens
        padded = []
        for slot_ids, weights, loads in waves:
            sl, w = np.zeros((Q, K), np.int32), np.zeros((Q, K), np.float32)
            sl[:n], w[:n] = slot_ids, weights
            padded.append((sl, w, loads))
        bb, i32 = self.sp.backbone, np.int32
        x, k_c, v_c = _pf_begin(bb, self.cache, i32(row), i32(start), tok)
        k_c, v_c = list(k_c), list(v_c)
        for l, lp in enumerate(bb["layers"]):
            x, h, k_c[l], v_c[l] = _pf_layer(lp, x, k_c[l], v_c[l], i32(start), rc=self.rc)
            for sl, w, loads in padded:
                for e, s in loads:
                    load_layer(e, s, l)
                x = _pf_experts(slots_at(l), x, h, sl, w)
        nxt, e, wt, self.cache, self.rcache = _pf_end(
            bb,
            self.sp.router,
            self.cache,
            self.rcache,
            k_c,
            v_c,
            x,
            i32(row),
            i32(start),
            tok,
            i32(n),
            i32(is_last),
            _sp_arrays(sp_row),
            rc=self.rc,
        )
        return nxt, e, wt

    def decode(self, slots, tok_N, slot_NxK, w_NxK, active_N, sp_N):
        """Dispatch one decode step over all slots; returns device (tok [N], experts, weights)."""
        nxt, e, w, self.cache, self.rcache = _decode_jit(
            self.sp.backbone,
            self.sp.router,
            slots,
            self.cache,
            self.rcache,
            np.asarray(tok_N, np.int32),
            np.asarray(slot_NxK, np.int32),
            np.asarray(w_NxK, np.float32),
            np.asarray(active_N, bool),
            _sp_arrays(sp_N),
            rc=self.rc,
        )
        return nxt, e, w


def _sp_arrays(sp) -> tuple:
    t, k, p, seed, count = sp
    return (
        np.asarray(t, np.float32),
        np.asarray(k, np.int32),
        np.asarray(p, np.float32),
        np.asarray(seed, np.uint32),
        np.asarray(count, np.int32),
    )
