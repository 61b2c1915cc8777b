"""The serving engine: request queue, admission, prefill, decode, completion, expert cache;
`generate` runs it over a list of prompts. Dimension letters: the glossary in model/config.py.

Each engine *step* runs one batch chosen by `batching.schedule` as a sequence of *calls*:
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

Live use: `start()`, then `submit(request)` at any time (it enters when the clock passes its
`arrival_s`), `step()` (admit arrivals, run one step; returns the tokens emitted and the requests
finished), `cancel(id)` between steps (frees the request slot), `has_work`, `result()`. `run()`
is that loop over a fixed list of requests. A request whose routing raises, or whose step
raises, fails with status "error"; the other requests are served on.

Time: the engine clock advances by each step's duration; requests arrive when the clock passes
their `arrival_s`; an idle engine jumps to the next arrival. The duration comes from a `clock`:
measured wall time by default, or a cost model (a simulated accelerator: bench.costmodel.CostClock).

The backend computes: `ModelBackend` runs the jitted steps of `decode.py` on an
`OffloadedExpertStore`; `ReplayBackend` returns the tokens and experts of a recorded run, so a
schedule can be re-timed under a cost model without the model (outputs do not depend on
batching or cache policy, which the tests check).
"""

from __future__ import annotations

import bisect
import dataclasses
import time
from collections.abc import Callable, Sequence

import numpy as np

from readme_jax.decode.steps import PromptError, validate_tokens
from readme_jax.model.sampling import SamplingParams
from readme_jax.serve import batching
from readme_jax.serve.backend import ModelBackend
from readme_jax.serve.cache import ExpertCache, Future, dedup, make_policy
from readme_jax.serve.config import EngineConfig
from readme_jax.serve.decode import ServeParams
from readme_jax.serve.results import (  # noqa: F401 - re-exported: the engine's public names
    CANCELLED,
    ERROR,
    OK,
    RequestResult,
    RunResult,
    StepClock,
    StepOutput,
    WallClock,
)

GREEDY = SamplingParams()


@dataclasses.dataclass
class ServeRequest:
    id: int
    prompt: Sequence[int]
    max_new_tokens: int
    arrival_s: float = 0.0
    sampling: SamplingParams = SamplingParams()
    seed: int = 0


@dataclasses.dataclass
class _Live:
    req: ServeRequest
    sched: batching.Request
    prompt_experts: np.ndarray  # [S, A]
    prompt_weights: np.ndarray  # [S, A]
    res: RequestResult
    row: int | None = None
    done: int = 0  # prompt tokens prefilled
    next_experts: tuple[int, ...] = ()
    next_weights: tuple[float, ...] = ()

    @property
    def tokens(self) -> list[int]:
        return self.res.tokens


@dataclasses.dataclass
class Call:
    """One backend call: a decode over some rows, or one prefill chunk of one request."""

    kind: str  # decode | prefill
    groups: list[list[int]]  # its waves of experts (cache accesses), in order
    rows: list[_Live]  # decode: the active rows; prefill: [the request]
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


# ----------------------------------------------------------------------------- engine


class Engine:
    """Serves requests on a backend (ModelBackend or ReplayBackend) under an EngineConfig."""

    def __init__(self, backend, cfg: EngineConfig | None = None, clock=None):
        cfg = cfg or EngineConfig()
        self.backend, self.cfg = backend, cfg
        for k in ("num_slots", "max_len", "prefill_chunk"):
            if getattr(backend, k, getattr(cfg, k)) != getattr(cfg, k):
                raise ValueError(
                    f"backend {k}={getattr(backend, k)} but EngineConfig {k}="
                    f"{getattr(cfg, k)}; build the backend for this config"
                )
        self.clock = clock or WallClock()
        self.E = backend.num_experts
        self.cfg = cfg = cfg.for_experts(self.E)
        if cfg.capacity < backend.top_k:
            raise ValueError(f"capacity {cfg.capacity} is below top_k={backend.top_k}")
        self.C = cfg.capacity

    def _new_cache(self) -> ExpertCache:
        kw = {}
        if self.cfg.cache_policy == "belady":
            kw["window"] = self.cfg.belady_window
        elif self.cfg.cache_policy == "random":
            kw["seed"] = self.cfg.policy_seed
        policy = make_policy(self.cfg.cache_policy, **kw)
        return ExpertCache(self.C, self.E, policy, bytes_per_expert=self.backend.bytes_per_expert)

    # ------------------------------------------------------------------ arrival

    def _arrive(self, req: ServeRequest, step: int) -> _Live | RequestResult:
        n = len(req.prompt)
        res = RequestResult(req.id, n, arrival_s=req.arrival_s, arrival_step=step)
        T = self.cfg.max_len
        try:
            if req.max_new_tokens < 1:
                raise PromptError(f"max_new_tokens must be >= 1, got {req.max_new_tokens}")
            validate_tokens(req.prompt, self.backend.vocab_size, f"request {req.id} prompt")
            if n + req.max_new_tokens > T:
                raise PromptError(
                    f"request {req.id}: prompt of {n} tokens + max_new_tokens="
                    f"{req.max_new_tokens} = {n + req.max_new_tokens} exceeds the serving context "
                    f"of {T} tokens (EngineConfig.max_len); shorten the prompt, lower "
                    "max_new_tokens or raise max_len"
                )
        except PromptError as err:
            res.status, res.error = ERROR, str(err)
            res.finish_s, res.finish_step = req.arrival_s, step
            return res
        pe, pw = self.backend.route_prompt(req)
        res.prompt_experts, res.prompt_weights = pe.tolist(), pw.tolist()
        sched = batching.Request(
            req.id, n, req.max_new_tokens, arrival_step=step, prompt_experts=pe[:, 0].tolist()
        )
        return _Live(req, sched, pe, pw, res)

    # ------------------------------------------------------------------ waves

    def _decode_calls(self, rows: list[_Live], cache: ExpertCache) -> list[Call]:
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

    def _prefill_calls(self, live: _Live, cache: ExpertCache) -> list[Call]:
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

    def _known_future(self, live: dict[int, _Live], batch: batching.Batch) -> list[int]:
        """Accesses expected after this step: decoding requests keep their expert (temporal
        locality), then queued prompts in arrival order."""
        chosen = set(batch.prefill)
        guess = dedup(
            e for l in live.values() if l.sched.state == batching.DECODING for e in l.next_experts
        )
        queued = sorted(
            (
                l
                for l in live.values()
                if l.sched.state == batching.WAITING and l.req.id not in chosen
            ),
            key=lambda l: (l.req.arrival_s, l.req.id),
        )
        return guess + [int(e) for l in queued for e in l.prompt_experts.reshape(-1)]

    # ------------------------------------------------------------------ step

    def _step(self, batch, live, cache, free_rows, step) -> tuple[dict, list]:
        dec = [live[i] for i in batch.decode]
        pre = [live[i] for i in batch.prefill]
        for l in pre:
            l.row = free_rows.pop(0)
        calls = self._decode_calls(dec, cache)
        for l in pre:
            calls += self._prefill_calls(l, cache)
        future = self._known_future(live, batch)
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
            handles.append(self._dispatch(c, waves))
            records.append(rec)
        prefetch = []
        if self.cfg.prefetch and calls:
            nxt, rest = self._predict_next(live, batch, future)
            for ld in cache.prefetch(calls[-1].groups[-1], nxt, rest, step=step):
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

    def _predict_next(self, live, batch, future):
        """Next step's experts if decoding requests keep their expert, plus the oldest queued
        prompt (as the scheduler will most likely admit it); and the accesses after it."""
        chosen = set(batch.prefill)
        queued = sorted(
            (
                l
                for l in live.values()
                if l.sched.state == batching.WAITING and l.req.id not in chosen
            ),
            key=lambda l: (l.req.arrival_s, l.req.id),
        )
        nxt = [e for l in live.values() if l.req.id in batch.ids for e in l.next_experts]
        if queued:
            nxt += [int(e) for e in queued[0].prompt_experts.reshape(-1)]
        return dedup(nxt), future

    def _dispatch(self, c: Call, waves: list[tuple[dict[int, int], list]]):
        """Issue a call. waves: per wave, (expert -> slot after its access, its loads)."""
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
        rows: list[_Live | None] = [None] * N
        for l in c.rows:
            rows[l.row] = l
            slot_NxA[l.row] = [slot_of[e] for e in l.next_experts]
            w_NxA[l.row] = l.next_weights
        ahead = (
            self.cfg.lookahead
            and self._quiet()
            and any(len(l.res.tokens) + 1 < l.req.max_new_tokens for l in c.rows)
        )
        return self.backend.decode(rows, slot_NxA, w_NxA, lookahead=ahead)

    def _quiet(self) -> bool:
        """Nothing submitted or waiting for a slot: the next step is most likely this decode
        batch again."""
        return not self._pending and all(
            l.sched.state != batching.WAITING for l in self._live.values()
        )

    # ------------------------------------------------------------------ live loop

    def start(self) -> None:
        """Begin a session: a fresh expert cache, KV caches and clock; no requests."""
        self._cache = self._new_cache()
        self.backend.reset(self._cache)
        self.clock.reset()
        self._pending: list[ServeRequest] = []  # sorted by (arrival_s, id)
        self._live: dict[int, _Live] = {}
        self._done: dict[int, RequestResult] = {}
        self._free_rows = list(range(self.cfg.num_slots))
        self._steps: list[dict] = []
        self._seen: set[int] = set()
        self.now, self.step_index = 0.0, 0

    @property
    def has_work(self) -> bool:
        """True while a request is queued (pending arrival) or being served."""
        return bool(self._pending or self._live)

    @property
    def num_waiting(self) -> int:
        """Requests submitted but not holding a request slot (the queue length)."""
        waiting = sum(l.sched.state == batching.WAITING for l in self._live.values())
        return len(self._pending) + waiting

    @property
    def cache_stats(self):
        """The session's expert cache statistics (hits, misses, loads, bytes_moved)."""
        return self._cache.stats

    @property
    def num_running(self) -> int:
        return sum(l.sched.state == batching.DECODING for l in self._live.values())

    def submit(self, req: ServeRequest) -> None:
        """Queue a request; it enters at `req.arrival_s` on the engine clock (`now`: at once).

        Raises ValueError for a request id already submitted in this session."""
        if req.id in self._seen:
            raise ValueError(f"request id {req.id} was already submitted")
        self._seen.add(req.id)
        bisect.insort(self._pending, req, key=lambda r: (r.arrival_s, r.id))

    def cancel(self, rid: int, reason: str = "cancelled") -> RequestResult | None:
        """Withdraw a queued or running request between steps, freeing its request slot.

        Returns its result (status `CANCELLED`, the tokens so far) or None if it is unknown or
        already finished."""
        for i, r in enumerate(self._pending):
            if r.id == rid:
                del self._pending[i]
                res = RequestResult(rid, len(r.prompt), arrival_s=r.arrival_s)
                return self._close(res, CANCELLED, reason)
        l = self._live.pop(rid, None)
        if l is None:
            return None
        l.sched.state = batching.DONE
        if l.row is not None:
            self._free_rows.append(l.row)
            self._free_rows.sort()
        return self._close(l.res, CANCELLED, reason)

    def _close(self, res: RequestResult, status: str, reason: str) -> RequestResult:
        res.status, res.error = status, reason
        res.finish_reason = CANCELLED if status == CANCELLED else None
        res.finish_s, res.finish_step = self.now, self.step_index
        self._done[res.id] = res
        return res

    def step(self) -> StepOutput:
        """Admit the requests that have arrived and run one engine step (or, when nothing is
        being served, move the clock to the next arrival). Returns the tokens emitted and the
        requests finished (or rejected) by it."""
        cfg, out = self.cfg, StepOutput()
        t0 = time.perf_counter()
        while self._pending and self._pending[0].arrival_s <= self.now:
            req = self._pending.pop(0)
            try:
                got = self._arrive(req, self.step_index)
            except Exception as err:  # an engine fault on one prompt fails that request alone
                res = RequestResult(req.id, len(req.prompt), arrival_s=req.arrival_s)
                got = self._close(res, ERROR, f"engine error: {err!r}")
            if isinstance(got, RequestResult):
                self._done[got.id] = got
                out.finished.append(got)
            else:
                self._live[got.req.id] = got
        if not self._live:
            if self._pending:
                self.now = max(self.now, self._pending[0].arrival_s)
            return out
        ready = [l.sched for l in self._live.values()]
        batch = batching.schedule(
            cfg.batching,
            ready,
            cfg.max_batch_tokens,
            step=self.step_index,
            max_wait=cfg.max_wait,
            num_slots=cfg.num_slots,
            resident=self._cache.resident,
            max_experts=cfg.max_experts,
        )
        if not batch.ids:
            raise RuntimeError(f"step {self.step_index}: the scheduler chose an empty batch")
        batching.age(ready, batch)
        try:
            rec, outs = self._step(batch, self._live, self._cache, self._free_rows, self.step_index)
        except Exception as err:  # fails the requests of this batch, not the session
            out.fault = f"engine error: {err!r}"
            for rid in batch.ids:  # cancel frees the slot and returns the request's result
                out.finished.append(self._close(self.cancel(rid), ERROR, out.fault))
            return out
        wall = time.perf_counter() - t0
        rec["time_s"], rec["wall_s"] = self.now, wall
        rec["duration_s"] = dur = self.clock.duration(rec, wall, self.now)
        self.now += dur
        for l in self._complete(outs, self.step_index, self.now, out.tokens.append):
            self._done[l.req.id] = l.res
            out.finished.append(l.res)
            self._free_rows.append(l.row)
            self._free_rows.sort()
            del self._live[l.req.id]
        self._steps.append(rec)
        out.record = rec
        self.step_index += 1
        return out

    def result(self) -> RunResult:
        """Everything finished so far in this session, by request id."""
        c = self._cache
        done = [self._done[i] for i in sorted(self._done)]
        return RunResult(self.cfg, done, self._steps, c.stats, c.log, self.now, self.E)

    def run(
        self,
        requests: Sequence[ServeRequest],
        on_token: Callable[[int, int], None] | None = None,
    ) -> RunResult:
        """Serve `requests` (any order; each enters at its arrival_s) to completion."""
        ids = [r.id for r in requests]
        if len(set(ids)) != len(ids):
            raise ValueError("request ids must be unique")
        self.start()
        for r in requests:
            self.submit(r)
        while self.has_work:
            out = self.step()
            if on_token is not None:
                for rid, tok in out.tokens:
                    on_token(rid, tok)
        return self.result()

    def _complete(self, outs, step, t, emit) -> list[_Live]:
        """Apply a step's sampled tokens (each kept one passed to `emit((id, token))`);
        returns the requests that finished."""
        eos = set(self.backend.eos_ids)
        finished = []
        for c, (tok, experts, weights) in outs:
            if c.kind == "prefill":
                l = c.rows[0]
                l.done = c.start + c.n
                if not c.is_last:
                    continue
                got = [(l, int(tok), experts, weights)]
                l.sched.state = batching.DECODING
                l.res.first_token_s, l.res.first_token_step = t, step
            else:
                got = [(l, int(tok[l.row]), experts[l.row], weights[l.row]) for l in c.rows]
            for l, tk, ex, wt in got:
                l.sched.generated += 1
                stop = tk in eos
                if not stop or self.cfg.include_eos:
                    l.res.tokens.append(tk)
                    l.res.experts.append([int(e) for e in ex])
                    l.res.weights.append([float(x) for x in wt])
                    emit((l.req.id, tk))
                if stop or len(l.res.tokens) >= l.req.max_new_tokens:
                    l.res.finish_reason = "eos" if stop else "length"
                    l.res.finish_s, l.res.finish_step = t, step
                    l.sched.state = batching.DONE
                    finished.append(l)
                else:
                    l.next_experts = tuple(int(e) for e in ex)
                    l.next_weights = tuple(float(x) for x in wt)
                    l.sched.next_expert = l.next_experts[0]
        return finished


# ----------------------------------------------------------------------------- generate


@dataclasses.dataclass
class MoEGeneration:
    tokens: list[list[int]]
    results: list[RequestResult]
    stats: dict


def generate(
    sp: ServeParams,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampling: SamplingParams = GREEDY,
    *,
    capacity: int | None = None,
    cache_policy: str = "belady",
    prefetch: bool = False,
    seed: int = 0,
    max_len: int = EngineConfig.max_len,
    num_slots: int | None = None,
    prefill_chunk: int = 32,
    on_token: Callable[[int, int], None] | None = None,
    backend: ModelBackend | None = None,
) -> MoEGeneration:
    """Generate for every prompt (all arrive at once) with C = `capacity` expert slots
    (None: all resident). Prompt i's result is request i; errors (e.g. a prompt too long) are
    reported in `results[i].error` with empty tokens. `on_token(i, token)` streams.

    Every shape comes from the engine's configuration (num_slots, max_len, prefill_chunk), not
    from the prompts' lengths: a request never recompiles a step; one that does not fit
    max_len is an error result."""
    longest = max(len(p) for p in prompts)
    cfg = EngineConfig(
        num_slots=num_slots or min(8, len(prompts)),
        max_len=max_len,
        prefill_chunk=prefill_chunk,
        max_batch_tokens=max(128, longest),
        cache_policy=cache_policy,
        capacity=capacity,
        prefetch=prefetch,
    ).for_experts(sp.num_experts)
    backend = backend or ModelBackend.for_config(sp, cfg)
    reqs = [
        ServeRequest(i, list(p), max_new_tokens, sampling=sampling, seed=seed + i)
        for i, p in enumerate(prompts)
    ]
    run = Engine(backend, cfg).run(reqs, on_token=on_token)
    stats = run.summary() | {"capacity": cfg.capacity, "num_experts": sp.num_experts}
    stats |= {"policy": cfg.cache_policy, "prefetch": cfg.prefetch}
    # decode rate over decode-only steps, the first one (which compiles) left out
    dec = [st for st in run.steps if not st["prefill"]][1:]
    durs = [st["duration_s"] for st in dec]
    span = sum(durs)
    stats["decode_tok_s"] = sum(len(st["decode"]) for st in dec) / span if span else float("nan")
    stats["decode_step_median_s"] = float(np.median(durs)) if durs else float("nan")
    return MoEGeneration([r.tokens for r in run.results], run.results, stats)
