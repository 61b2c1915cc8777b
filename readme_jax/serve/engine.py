"""The serving engine: a session of requests over a backend. It owns the request queue,
admission, the clock, completion and cancellation, and the expert cache's lifetime; how one
scheduled batch becomes backend calls, expert waves and cache accesses is `executor.py`'s job,
a request's own bookkeeping `requests.py`'s. `generate` runs the engine over a list of prompts.
Dimension letters: the glossary in model/config.py.

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

from readme_jax.model.sampling import SamplingParams
from readme_jax.serve import batching
from readme_jax.serve.backend import ModelBackend
from readme_jax.serve.cache import ExpertCache, make_policy
from readme_jax.serve.config import EngineConfig
from readme_jax.serve.decode import ServeParams
from readme_jax.serve.executor import StepExecutor, sampled_tokens
from readme_jax.serve.requests import (  # noqa: F401 - re-exported: the engine's public names
    LiveRequest,
    ServeRequest,
    admit,
    record_token,
)
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
        self.executor = StepExecutor(backend, cfg)

    def _new_cache(self) -> ExpertCache:
        kw = {}
        if self.cfg.cache_policy == "belady":
            kw["window"] = self.cfg.belady_window
        elif self.cfg.cache_policy == "random":
            kw["seed"] = self.cfg.policy_seed
        policy = make_policy(self.cfg.cache_policy, **kw)
        return ExpertCache(self.C, self.E, policy, bytes_per_expert=self.backend.bytes_per_expert)

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
        self._live: dict[int, LiveRequest] = {}
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
        self._free_row(l)
        return self._close(l.res, CANCELLED, reason)

    def _free_row(self, l: LiveRequest) -> None:
        if l.row is not None:
            self._free_rows.append(l.row)
            self._free_rows.sort()

    def _close(self, res: RequestResult, status: str, reason: str) -> RequestResult:
        res.status, res.error = status, reason
        res.finish_reason = CANCELLED if status == CANCELLED else None
        res.finish_s, res.finish_step = self.now, self.step_index
        self._done[res.id] = res
        return res

    def _admit_arrivals(self, out: StepOutput) -> None:
        """Move the requests whose arrival time has come into service (or to their error
        result)."""
        while self._pending and self._pending[0].arrival_s <= self.now:
            req = self._pending.pop(0)
            try:
                got = admit(req, self.step_index, self.backend, self.cfg.max_len)
            except Exception as err:  # an engine fault on one prompt fails that request alone
                res = RequestResult(req.id, len(req.prompt), arrival_s=req.arrival_s)
                got = self._close(res, ERROR, f"engine error: {err!r}")
            if isinstance(got, RequestResult):
                self._done[got.id] = got
                out.finished.append(got)
            else:
                self._live[got.req.id] = got

    def _schedule(self) -> batching.Batch:
        cfg = self.cfg
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
        return batch

    def step(self) -> StepOutput:
        """Admit the requests that have arrived and run one engine step (or, when nothing is
        being served, move the clock to the next arrival). Returns the tokens emitted and the
        requests finished (or rejected) by it."""
        out = StepOutput()
        t0 = time.perf_counter()
        self._admit_arrivals(out)
        if not self._live:
            if self._pending:
                self.now = max(self.now, self._pending[0].arrival_s)
            return out
        batch = self._schedule()
        try:
            rec, outs = self.executor.run(
                batch, self._live, self._cache, self._free_rows, self.step_index, self._quiet()
            )
        except Exception as err:  # fails the requests of this batch, not the session
            out.fault = f"engine error: {err!r}"
            for rid in batch.ids:  # cancel frees the slot and returns the request's result
                out.finished.append(self._close(self.cancel(rid), ERROR, out.fault))
            return out
        wall = time.perf_counter() - t0
        rec["time_s"], rec["wall_s"] = self.now, wall
        rec["duration_s"] = dur = self.clock.duration(rec, wall, self.now)
        self.now += dur
        self._complete(outs, out)
        self._steps.append(rec)
        out.record = rec
        self.step_index += 1
        return out

    def _complete(self, outs: list, out: StepOutput) -> None:
        """Apply a step's sampled tokens (each kept one to `out.tokens`) at the clock's new
        time; finished requests leave service and free their rows."""
        eos, t, step = set(self.backend.eos_ids), self.now, self.step_index
        for l, tok, experts, weights in sampled_tokens(outs):
            if l.sched.state == batching.WAITING:  # the token after its prompt
                l.sched.state = batching.DECODING
                l.res.first_token_s, l.res.first_token_step = t, step
            if record_token(l, tok, experts, weights, eos, self.cfg.include_eos):
                out.tokens.append((l.req.id, tok))
            if l.sched.state == batching.DONE:
                l.res.finish_s, l.res.finish_step = t, step
                self._done[l.req.id] = l.res
                out.finished.append(l.res)
                self._free_row(l)
                del self._live[l.req.id]

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
