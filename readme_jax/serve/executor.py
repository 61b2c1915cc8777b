"""One engine step on the backend: a scheduled batch -> backend calls -> their expert waves ->
cache accesses and loads -> dispatch -> the tokens each call sampled.

A step runs the batch chosen by `batching.schedule` as a sequence of *calls*:
  decode   rows of decoding requests grouped by their next token's experts, at most C per
           call; one call runs all N slots with only its rows active (rows are independent).
  prefill  per admitted request, chunks of `prefill_chunk` prompt tokens; a call streams the
           chunk layer by layer and runs its routed experts in *waves* of at most C distinct
           experts (in every layer, each wave's weights are loaded just before it runs).
Every wave (a decode call is one wave) is one `ExpertCache.access`: hits, misses, evictions
(Belady's future: the step's later waves, then each decoding request's current expert, then
the queued prompts' experts); the backend loads the misses into the store's device slots. With
`prefetch`, after the step is dispatched the cache plans loads for the predicted next step
(decoding requests keep their expert; the oldest queued prompt) so they overlap the compute.

The engine (engine.py) owns the requests, the clock and the session; this module owns how one
batch becomes device work. Dimension letters: the glossary in model/config.py.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from readme_jax.serve import batching
from readme_jax.serve.cache import ExpertCache, Future, dedup
from readme_jax.serve.config import EngineConfig
from readme_jax.serve.requests import LiveRequest

# per wave: (expert -> its slot after the wave's access, the wave's loads [(expert, slot)])
Wave = tuple[dict[int, int], list[tuple[int, int]]]


@dataclasses.dataclass
class Call:
    """One backend call: a decode over some rows, or one prefill chunk of one request."""

    kind: str  # decode | prefill
    groups: list[list[int]]  # its waves of experts (cache accesses), in order
    rows: list[LiveRequest]  # decode: the active rows; prefill: [the request]
    start: int = 0  # prefill: first prompt position of the chunk
    n: int = 0  # prefill: tokens in the chunk
    is_last: bool = False

    def record(self) -> dict:
        if self.kind == "decode":
            ctx = sum(r.sched.prompt_len + len(r.tokens) for r in self.rows)
            toks = len(self.rows)
        else:
            ctx, toks = self.start + self.n, self.n
        experts = dedup(e for g in self.groups for e in g)
        return {
            "kind": self.kind,
            "experts": experts,
            "groups": self.groups,
            "tokens": toks,
            "context": ctx,
        }


def _queued(live: dict[int, LiveRequest], batch: batching.Batch) -> list[LiveRequest]:
    """Requests waiting for a prefill that this batch does not start, in arrival order."""
    chosen = set(batch.prefill)
    waiting = (
        l for l in live.values() if l.sched.state == batching.WAITING and l.req.id not in chosen
    )
    return sorted(waiting, key=lambda l: (l.req.arrival_s, l.req.id))


def known_future(live: dict[int, LiveRequest], batch: batching.Batch) -> list[int]:
    """Accesses expected after this step: decoding requests keep their expert (temporal
    locality), then queued prompts in arrival order."""
    guess = dedup(
        e for l in live.values() if l.sched.state == batching.DECODING for e in l.next_experts
    )
    return guess + [int(e) for l in _queued(live, batch) for e in l.prompt_experts.reshape(-1)]


def predict_next(live: dict[int, LiveRequest], batch: batching.Batch) -> list[int]:
    """Next step's experts if this batch's requests keep their expert, plus the oldest queued
    prompt (as the scheduler will most likely admit it)."""
    queued = _queued(live, batch)
    nxt = [e for l in live.values() if l.req.id in batch.ids for e in l.next_experts]
    if queued:
        nxt += [int(e) for e in queued[0].prompt_experts.reshape(-1)]
    return dedup(nxt)


class StepExecutor:
    """Runs scheduled batches on a backend (ModelBackend or ReplayBackend) with C = cfg.capacity
    expert slots."""

    def __init__(self, backend, cfg: EngineConfig):
        self.backend, self.cfg, self.C = backend, cfg, cfg.capacity

    def decode_calls(self, rows: list[LiveRequest], cache: ExpertCache) -> list[Call]:
        """Decoding rows packed into calls of at most C distinct experts."""
        # resident experts first: the first call then needs no load when it can
        res = cache.resident
        rows = sorted(rows, key=lambda r: (not set(r.next_experts) <= res, r.next_experts))
        calls: list[Call] = []
        for r in rows:
            need = set(r.next_experts)
            for c in calls:
                if len(set(c.groups[0]) | need) <= self.C:
                    c.groups[0] = dedup([*c.groups[0], *r.next_experts])
                    c.rows.append(r)
                    break
            else:
                calls.append(Call("decode", [dedup(r.next_experts)], [r]))
        return calls

    def prefill_calls(self, live: LiveRequest, cache: ExpertCache) -> list[Call]:
        """Fixed chunks (whatever C, so outputs do not depend on C); waves of C experts each,
        resident experts first."""
        S, Q, res = live.sched.prompt_len, self.cfg.prefill_chunk, cache.resident
        calls = []
        for a in range(0, S, Q):
            b = min(a + Q, S)
            experts = dedup(live.prompt_experts[a:b].reshape(-1).tolist())
            experts.sort(key=lambda e: e not in res)  # stable: first occurrence otherwise
            groups = [experts[i : i + self.C] for i in range(0, len(experts), self.C)]
            calls.append(Call("prefill", groups, [live], a, b - a, b == S))
        return calls

    def run(
        self,
        batch: batching.Batch,
        live: dict[int, LiveRequest],
        cache: ExpertCache,
        free_rows: list[int],
        step: int,
        quiet: bool,
    ) -> tuple[dict, list]:
        """Run one batch: each prefilled request takes a free row, every wave accesses the
        cache, every call is dispatched (then prefetch, when on) before any is read back.
        `quiet`: nothing is waiting, so a decode call may dispatch its lookahead step.

        Returns (the step's record, [(call, (tokens, experts, weights))] read back)."""
        dec = [live[i] for i in batch.decode]
        pre = [live[i] for i in batch.prefill]
        for l in pre:
            l.row = free_rows.pop(0)
        calls = self.decode_calls(dec, cache)
        for l in pre:
            calls += self.prefill_calls(l, cache)
        future = known_future(live, batch)
        flat = [e for c in calls for g in c.groups for e in g]
        fut, pos, wave = Future(flat + future), 0, 0
        records, handles = [], []
        for c in calls:
            waves, rec = [], c.record() | {"hits": 0, "loads": 0, "prefetched": 0}
            for g in c.groups:
                pos += len(g)
                decisions = cache.access(g, fut.at(pos), step=step, wave_index=wave)
                wave += 1
                loads = [(d.expert, d.slot) for d in decisions if d.needs_load]
                waves.append(({e: cache.slot_of(e) for e in g}, loads))
                rec["hits"] += sum(d.hit for d in decisions)
                rec["loads"] += len(loads)
                rec["prefetched"] += sum(d.prefetched for d in decisions)
            handles.append(self._dispatch(c, waves, quiet))
            records.append(rec)
        prefetch = []
        if self.cfg.prefetch and calls:
            nxt = predict_next(live, batch)
            for ld in cache.prefetch(calls[-1].groups[-1], nxt, future, step=step):
                self.backend.load(ld.expert, ld.slot)
                prefetch.append([ld.expert, ld.slot])
        outs = [(c, self.backend.fetch(h)) for c, h in zip(calls, handles, strict=True)]
        rec = {
            "step": step,
            "prefill": list(batch.prefill),
            "decode": list(batch.decode),
            "batch_tokens": batch.tokens,
            "batch_experts": list(batch.experts),
            "calls": records,
            "prefetch": prefetch,
        }
        return rec, outs

    def _dispatch(self, c: Call, waves: list[Wave], quiet: bool):
        """Issue a call; returns the backend's handle."""
        if c.kind == "prefill":
            l = c.rows[0]
            pe = l.prompt_experts[c.start : c.start + c.n]  # [n, A]
            pw = l.prompt_weights[c.start : c.start + c.n]
            args = []
            for slot_of, loads in waves:
                inside = np.isin(pe, list(slot_of))
                slots = np.vectorize(lambda e, m=slot_of: m.get(e, 0), otypes=[np.int32])(pe)
                args.append((slots, np.where(inside, pw, 0.0), loads))
            return self.backend.prefill(l, c.start, c.n, args, c.is_last)
        ((slot_of, loads),) = waves
        for e, s in loads:
            self.backend.load(e, s)
        N, A = self.cfg.num_slots, self.backend.top_k
        slot_NxA, w_NxA = np.zeros((N, A), np.int32), np.zeros((N, A), np.float32)
        rows: list[LiveRequest | None] = [None] * N
        for l in c.rows:
            rows[l.row] = l
            slot_NxA[l.row] = [slot_of[e] for e in l.next_experts]
            w_NxA[l.row] = l.next_weights
        ahead = (
            self.cfg.lookahead
            and quiet
            and any(len(l.res.tokens) + 1 < l.req.max_new_tokens for l in c.rows)
        )
        return self.backend.decode(rows, slot_NxA, w_NxA, lookahead=ahead)


def sampled_tokens(outs: list) -> list[tuple[LiveRequest, int, np.ndarray, np.ndarray]]:
    """(request, token, its experts [A], weights [A]) of every token a step's calls sampled: a
    decode call's rows, and a prefill call's request when the chunk ends its prompt. Records
    each prefill chunk's progress (`LiveRequest.done`)."""
    got = []
    for c, (tok, experts, weights) in outs:
        if c.kind == "prefill":
            l = c.rows[0]
            l.done = c.start + c.n
            if c.is_last:
                got.append((l, int(tok), experts, weights))
        else:
            got += [(l, int(tok[l.row]), experts[l.row], weights[l.row]) for l in c.rows]
    return got
