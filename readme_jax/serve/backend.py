"""Compute backends of the serving engine.

`ModelBackend`: the step library (decode/steps.py, driven by `decode.SlotDecoder`). With every
expert resident (cache policy `all`: expert e in slot e) the steps read the in-graph experts, as
the static-batch `Generator` does; otherwise they read an `OffloadedExpertStore` whose C device
slots mirror the engine's `ExpertCache` (every load the cache decides is a real host->device copy).
`ReplayBackend`: the tokens and experts of a recorded run, for re-timing a schedule under a cost
model without running the model.

Both expose: num_experts, top_k, eos_ids, vocab_size, bytes_per_expert, num_slots;
reset(cache), route_prompt(req), load(expert, slot) (a whole expert, before a decode call, or a
prefetch), prefill(live, start, n, waves, is_last) (one chunk; each wave carries its slot ids,
weights and the loads to stream layer by layer before it), decode(rows, slot_NxA, w_NxA),
fetch(handle).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from readme_jax.decode.steps import SlotState
from readme_jax.serve.decode import PromptChunk, ServeParams, SlotDecoder
from readme_jax.serve.store import OffloadedExpertStore


def _sampling(lives) -> tuple:
    """(temperature, top_k, top_p, seed, count) arrays for rows (None = inactive)."""
    cols = [[], [], [], [], []]
    for l in lives:
        sp = l.req.sampling if l is not None else None
        vals = (
            (0.0, 0, 1.0, 0, 0)
            if l is None
            else (sp.temperature, sp.top_k, sp.top_p, l.req.seed, len(l.tokens))
        )
        for c, v in zip(cols, vals, strict=True):
            c.append(v)
    return tuple(np.asarray(c) for c in cols)


class ModelBackend:
    """The real model: `SlotDecoder` steps reading expert weights from the store's slots."""

    def __init__(
        self,
        sp: ServeParams,
        num_slots: int = 8,
        max_len: int = 512,
        prefill_chunk: int = 32,
        *,
        host_memory_kind: str | None = "pinned_host",
    ):
        self.sp = sp
        self.decoder = SlotDecoder(sp, num_slots, max_len, prefill_chunk)
        self.num_slots, self.max_len, self.prefill_chunk = num_slots, max_len, prefill_chunk
        cfg = sp.rc.model
        self.num_experts, self.top_k = sp.num_experts, sp.rc.moe.top_k
        self.eos_ids, self.vocab_size = tuple(cfg.eos_ids), cfg.vocab_size
        self.bytes_per_expert = sp.bytes_per_expert  # as the store moves it (sp.quant's form)
        self.host_memory_kind = host_memory_kind
        self.store: OffloadedExpertStore | None = None
        self.in_graph = False  # every expert resident in its own slot: the in-graph experts
        self._ahead = None  # (handle it continues, its active rows, its sampling, its handle)
        self.lookahead_stats = {"hits": 0, "dropped": 0}

    @classmethod
    def for_config(cls, sp: ServeParams, cfg, **kw) -> ModelBackend:
        return cls(sp, cfg.num_slots, cfg.max_len, cfg.prefill_chunk, **kw)

    def reset(self, cache) -> None:
        """Fresh KV caches; a store of the cache's capacity holding what the cache preloaded."""
        self._ahead = None
        if self.store is None or self.store.capacity != cache.capacity:
            self.store = None  # free the old slots first
            self.store = OffloadedExpertStore(
                self.sp.store_experts,
                cache.capacity,
                layer_axis=1,
                host_memory_kind=self.host_memory_kind,
            )
        for rec in cache.log:
            if rec["kind"] == "preload" and self.store.expert_in(rec["slot"]) != rec["expert"]:
                self.store.load(rec["expert"], rec["slot"])
        self.store.wait()
        pre = {r["expert"]: r["slot"] for r in cache.log if r["kind"] == "preload"}
        self.in_graph = pre == {e: e for e in range(self.num_experts)}
        self.decoder.reset()

    def route_prompt(self, req) -> tuple[np.ndarray, np.ndarray]:
        return self.decoder.route_prompt(list(req.prompt))

    def load(self, expert: int, slot: int) -> None:
        self.drop_ahead()
        self.store.load(expert, slot)

    def prefill(self, live, start, n, waves, is_last):
        """One chunk; waves: [(slot_ids [n, A], weights [n, A], loads)] (streamed by layer
        unless every expert is resident)."""
        self.drop_ahead()
        chunk = PromptChunk(
            row=live.row,
            start=start,
            tokens=list(live.req.prompt[start : start + n]),
            is_last=is_last,
            sp=tuple(c[0] for c in _sampling([live])),
        )
        if self.in_graph:
            return self.decoder.prefill(None, chunk, waves)
        store = self.store
        return self.decoder.prefill(
            lambda l: store.slots[l], chunk, waves, load_layer=store.load_layer
        )

    def decode(self, rows, slot_NxA, w_NxA, lookahead: bool = False):
        """Dispatch one decode step; returns its device handle.

        lookahead (every expert resident only): also dispatch the *next* step now, on this
        step's device outputs with the same rows, before the host reads this one (as the
        Generator does), so the host's work overlaps the device's. The next `decode` whose
        inputs are what that step assumed (the same rows or a subset, each with the token,
        experts and weights it produced) takes its result; rows it advanced that the engine
        did not continue are rewound (their cache length back by one). Any other call drops
        it the same way. Outputs are identical with and without lookahead."""
        tok = np.asarray([0 if l is None else l.tokens[-1] for l in rows], np.int32)
        active = np.asarray([l is not None for l in rows])
        sp = _sampling(rows)
        handle = self._take_ahead(tok, slot_NxA, w_NxA, active, sp)
        if handle is None:
            slots = None if self.in_graph else self.store.slots
            handle = self.decoder.decode(slots, SlotState(tok, slot_NxA, w_NxA, active, sp))
        if lookahead and self.in_graph:
            nxt_sp = (*sp[:4], sp[4] + active)
            ahead = self.decoder.decode(None, SlotState(*handle, active, nxt_sp))
            self._ahead = (handle, active, nxt_sp, ahead)
        return handle

    def _take_ahead(self, tok, slot_NxA, w_NxA, active, sp):
        """The lookahead step's handle if it ran on exactly these inputs (else None); rewinds
        the rows it advanced that these inputs do not continue."""
        if self._ahead is None:
            return None
        prev, active0, sp0, ahead = self._ahead
        self._ahead = None
        assumed = [np.asarray(x) for x in prev]  # its inputs: this step's outputs (ready)
        r = active
        hit = not np.any(active & ~active0) and all(
            np.array_equal(a[r], b[r])
            for a, b in zip((tok, slot_NxA, w_NxA, *sp), (*assumed, *sp0), strict=True)
        )
        self.decoder.rewind(active0 & ~active if hit else active0)
        self.lookahead_stats["hits" if hit else "dropped"] += 1
        return ahead if hit else None

    def drop_ahead(self) -> None:
        """Discard a pending lookahead step (rewinding the rows it advanced)."""
        if self._ahead is not None:
            self.decoder.rewind(self._ahead[1])
            self._ahead = None
            self.lookahead_stats["dropped"] += 1

    @staticmethod
    def fetch(handle):
        return tuple(np.asarray(x) for x in handle)


class ReplayBackend:
    """Returns a recorded run's outputs: request id -> RequestResult (tokens, experts, ...).

    Valid for any batching, cache policy and clock, since those never change a request's
    tokens; EOS is replayed where the recorded request stopped at EOS."""

    def __init__(
        self,
        records: Mapping[int, object],
        *,
        num_experts: int,
        top_k: int = 1,
        eos_ids=(),
        vocab_size: int = 1 << 31,
        bytes_per_expert: int = 0,
        num_slots: int = 8,
    ):
        self.records = dict(records)
        self.num_experts, self.top_k = num_experts, top_k
        self.eos_ids, self.vocab_size = tuple(eos_ids), vocab_size
        self.bytes_per_expert, self.num_slots = bytes_per_expert, num_slots

    def reset(self, cache) -> None:
        pass

    def load(self, expert: int, slot: int) -> None:
        pass

    def route_prompt(self, req):
        r = self._rec(req.id)
        pe = np.asarray(r.prompt_experts, np.int32).reshape(len(req.prompt), self.top_k)
        pw = np.asarray(r.prompt_weights, np.float32).reshape(len(req.prompt), self.top_k)
        return pe, pw

    def _rec(self, rid):
        if rid not in self.records:
            raise KeyError(f"request {rid} is not in the recorded run")
        return self.records[rid]

    def _token(self, rid: int, i: int):
        r = self._rec(rid)
        if i < len(r.tokens):
            return r.tokens[i], r.experts[i], r.weights[i]
        if r.finish_reason == "eos" and self.eos_ids:
            return self.eos_ids[0], [0] * self.top_k, [0.0] * self.top_k
        raise ValueError(f"request {rid}: the recorded run has no token {i}")

    def prefill(self, live, start, n, waves, is_last):
        if not is_last:
            return 0, np.zeros(self.top_k, np.int32), np.zeros(self.top_k, np.float32)
        tok, e, w = self._token(live.req.id, 0)
        return tok, np.asarray(e, np.int32), np.asarray(w, np.float32)

    def decode(self, rows, slot_NxA, w_NxA, lookahead: bool = False):
        N, A = len(rows), self.top_k
        tok, e, w = np.zeros(N, np.int32), np.zeros((N, A), np.int32), np.zeros((N, A), np.float32)
        for b, l in enumerate(rows):
            if l is not None:
                tok[b], e[b], w[b] = self._token(l.req.id, len(l.tokens))
        return tok, e, w

    @staticmethod
    def fetch(handle):
        return handle
