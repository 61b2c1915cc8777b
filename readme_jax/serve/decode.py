"""The serving engine's model state over a fixed set of N request slots: the parameters split
for serving (`ServeParams`) and `SlotDecoder`, a thin driver of the step library
(decode/steps.py) that holds the slots' KV caches. Dimension letters: the glossary in
`model/config.py`.

Expert sources (decode/steps.py): with every expert resident (cache policy `all`, expert e in
slot e) the steps read the in-graph experts in the decode layout, as the `Generator` does
(trimmed, fused, one jitted prefill call per chunk); with C < E slots they read the slot buffers
(`OffloadedExpertStore.slots`) and a prefill chunk streams layer by layer: in every layer the
chunk's routed experts run in waves of at most C, each wave's layer weights loaded just before
it, so the load of layer l+1 overlaps the compute of layer l (async dispatch).

Shapes come from the configuration only (decode [N, 1], prefill [1, Q], context M), so a
request's lengths never recompile a step. Exactness: on XLA:CPU a row of a matmul depends on
the matmul's shape but not on the other rows, so a request's tokens do not depend on batching,
waves or chunk boundaries (tested bitwise).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from readme_jax.decode import steps
from readme_jax.model import llama, quant
from readme_jax.model.config import ReadMEConfig
from readme_jax.model.router import init_router_cache

Params = dict[str, Any]
EXPERT_KEYS = ("expert_gate_up", "expert_down")


# ----------------------------------------------------------------------------- parameters


@dataclasses.dataclass
class ServeParams:
    """A Read-ME model split for serving.

    backbone: decode layout (per-layer list) without routed experts or layer-wise gates.
    router: pre-gating router params. experts: host NumPy {"gate_up": [E, L, D, 2, Fe],
    "down": [E, L, Fe, D]}, expert-major so that one expert is one contiguous slice.
    quant: the form of the matmul weights the steps run (model/quant.py): the backbone's, the
    in-graph experts' (every expert resident) and the offloaded experts' (`store_experts`: what
    an offload store holds and moves, so an int8 expert load moves a quarter of the f32 bytes).
    """

    rc: ReadMEConfig
    backbone: Params
    router: Params
    experts: dict[str, np.ndarray]
    quant: str = "none"

    @property
    def num_experts(self) -> int:
        return self.experts["gate_up"].shape[0]

    @functools.cached_property
    def store_experts(self) -> dict[str, Any]:
        """The routed experts in `quant`'s form, host leaves [E, L, ...] (int8: values and
        per-expert, per-layer, per-channel f32 scales), for `OffloadedExpertStore`."""
        return quant.quantize_experts(self.experts, self.quant)

    @property
    def bytes_per_expert(self) -> int:
        """Bytes of one expert as the store holds and moves it."""
        return quant.weight_bytes(jax.tree.map(lambda x: x[0], self.store_experts))


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


def resident_slots(experts: dict[str, Any]) -> list[Params]:
    """All E experts as slot buffers (slot e = expert e): the no-offload layout. experts: the
    host experts in any form (`ServeParams.experts` or `store_experts`)."""
    L = experts["gate_up"].shape[1]
    dev = jax.devices()[0]  # committed, like the store's slots: the same compiled steps
    return [jax.device_put(jax.tree.map(lambda x, l=l: x[:, l], experts), dev) for l in range(L)]


def graph_params(sp: ServeParams) -> Params:
    """The full model in the decode layout of the in-graph expert source (steps.decode_layout),
    on device: what the Generator runs."""
    E = sp.num_experts
    layers = [
        {
            **lp,
            "expert_gate_up": [sp.experts["gate_up"][e, l] for e in range(E)],
            "expert_down": [sp.experts["down"][e, l] for e in range(E)],
        }
        for l, lp in enumerate(sp.backbone["layers"])
    ]
    full = {"backbone": {**sp.backbone, "layers": layers}, "router": sp.router}
    return jax.device_put(steps.decode_layout(sp.rc, full, sp.quant), jax.devices()[0])


@dataclasses.dataclass(frozen=True)
class PromptChunk:
    """One prompt chunk of one slot row, as the host hands it to `SlotDecoder.prefill`.

    row: the slot row. start: the position of the chunk's first token. tokens: the chunk's
    tokens (1 to the decoder's chunk size). is_last: the chunk ends the prompt (only then do the
    next token and its router KV count). sp: the request's sampling (temperature, top_k, top_p,
    seed, count), scalars."""

    row: int
    start: int
    tokens: list[int]
    is_last: bool
    sp: tuple


class SlotDecoder:
    """Compiled steps over `num_slots` request slots with a context of `max_len` tokens.

    Holds the KV caches; the caller owns the expert slot buffers and the slot index maps.
    `slots=None` in `prefill`/`decode` selects the in-graph experts (every expert resident,
    slot ids = expert ids)."""

    def __init__(self, sp: ServeParams, num_slots: int, max_len: int, prefill_chunk: int = 32):
        cfg = sp.rc.model
        if max_len > cfg.max_seq_len:
            raise ValueError(f"max_len={max_len} exceeds the model context {cfg.max_seq_len}")
        self.sp, self.rc = sp, sp.rc
        self.num_slots, self.max_len, self.chunk = num_slots, max_len, prefill_chunk
        self.top_k = sp.rc.moe.top_k
        self.device = jax.devices()[0]
        self._graph = None
        self.params = {
            "backbone": quant.quantize_params(sp.backbone, sp.quant),
            "router": sp.router,
        }
        self.reset()

    @property
    def graph(self) -> Params:
        if self._graph is None:
            self._graph = graph_params(self.sp)
        return self._graph

    def reset(self) -> None:
        # committed like the step outputs, so the second call does not recompile
        dev, rc, N, M = self.device, self.rc, self.num_slots, self.max_len
        self.cache = jax.device_put(llama.init_cache(rc.model, N, M, per_layer=True), dev)
        self.rcache = jax.device_put(
            init_router_cache(rc.router, rc.model, N, M, per_layer=True), dev
        )

    def route_prompt(self, tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """(experts [S, A] int, weights [S, A]) of a prompt."""
        S = len(tokens)
        buf = np.zeros((1, self.max_len), np.int32)  # one shape: one compile, one rounding
        buf[0, :S] = tokens
        e, w = steps.route_prompt_jit(self.sp.router, jnp.asarray(buf), rc=self.rc)
        return np.asarray(e)[0, :S], np.asarray(w)[0, :S]  # slice on host: no per-S compile

    def prefill(self, slots, chunk: PromptChunk, waves, *, load_layer=None):
        """Dispatch one prefill chunk (at most `self.chunk` tokens).

        slots: None (in-graph experts: one call, `waves` must be one wave without loads), the
        slot buffers (list over L), or a callable layer -> buffer (a store's, read after that
        layer's loads): then the chunk streams layer by layer. waves: [(slot_ids [n, A],
        weights [n, A], loads)], weights 0 for tokens/experts outside the wave; before a wave's
        experts run in layer l, `load_layer(expert, slot, l)` is called for each (expert, slot)
        of its `loads`. Returns device (tok, experts, weights) of the token after the chunk."""
        n, (Q, A) = len(chunk.tokens), (self.chunk, self.top_k)
        if not 1 <= n <= Q:
            raise ValueError(f"a prefill chunk holds 1..{Q} tokens, got {n}")
        tok = np.zeros(Q, np.int32)
        tok[:n] = chunk.tokens
        padded = []
        for slot_ids, weights, loads in waves:
            sl, w = np.zeros((Q, A), np.int32), np.zeros((Q, A), np.float32)
            sl[:n], w[:n] = slot_ids, weights
            padded.append((sl, w, loads))
        i32, spa = np.int32, _sp_arrays(chunk.sp)
        start = i32(chunk.start)
        step_chunk = steps.PrefillChunk(i32(chunk.row), start, tok, i32(n), i32(chunk.is_last), spa)
        sampled = bool(spa[0] > 0)
        if slots is None:
            ((sl, w, _),) = padded
            nxt, e, wt, self.cache, self.rcache = steps.prefill_jit(
                self.graph,
                None,
                self.cache,
                self.rcache,
                step_chunk,
                (sl, w),
                rc=self.rc,
                sampled=sampled,
            )
            return nxt, e, wt
        slots_at = slots if callable(slots) else slots.__getitem__
        bb = self.params["backbone"]
        st = steps.pf_begin_jit(bb, self.cache, step_chunk)
        x, k_c, v_c = st.x_1xQxD, list(st.k), list(st.v)
        for l, lp in enumerate(bb["layers"]):
            x, h, k_c[l], v_c[l] = steps.chunk_layer_jit(lp, x, k_c[l], v_c[l], start, rc=self.rc)
            for sl, w, loads in padded:
                for e, s in loads:
                    load_layer(e, s, l)
                x = steps.pf_experts_jit(slots_at(l), x, h, sl, w)
        nxt, e, wt, self.cache, self.rcache = steps.pf_end_jit(
            bb,
            self.sp.router,
            self.cache,
            self.rcache,
            steps.ChunkState(x, k_c, v_c),
            step_chunk,
            rc=self.rc,
            sampled=sampled,
        )
        return nxt, e, wt

    def _on_device(self, x, dtype):
        """x committed on the device like a step's outputs (a lookahead step passes those), so
        both kinds of input share one compiled step."""
        return x if isinstance(x, jax.Array) else jax.device_put(np.asarray(x, dtype), self.device)

    def rewind(self, rows_N) -> None:
        """Undo the last decode step of rows_N ([N] bool): their backbone and router cache
        lengths go back by one (the key/value written there is masked, then overwritten)."""
        if np.any(rows_N):
            back = jnp.asarray(np.asarray(rows_N, np.int32))
            self.cache = {**self.cache, "lengths": self.cache["lengths"] - back}
            self.rcache = {**self.rcache, "lengths": self.rcache["lengths"] - back}

    def decode(self, slots, rows: steps.SlotState):
        """Dispatch one decode step over all slots (slots None: in-graph experts, slot ids =
        expert ids); rows' fields may be host or device arrays. Returns device (tok [N],
        experts [N, A], weights [N, A])."""
        spa = _sp_arrays(rows.sp)
        rows = steps.SlotState(
            self._on_device(rows.tok_N, np.int32),  # device arrays: the lookahead step, no sync
            self._on_device(rows.exp_NxA, np.int32),
            self._on_device(rows.w_NxA, np.float32),
            np.asarray(rows.active_N, bool),
            spa,
        )
        nxt, e, w, self.cache, self.rcache = steps.decode_jit(
            self.params if slots is not None else self.graph,
            slots,
            self.cache,
            self.rcache,
            rows,
            rc=self.rc,
            sampled=bool(np.any(spa[0] > 0)),
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
