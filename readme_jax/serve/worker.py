"""The engine thread of the HTTP server: one thread owns the `Engine` (model, KV caches, expert
store, device); other threads only `submit` requests and `cancel` them, through a thread-safe
inbox, and receive each request's tokens through the callback they submitted with.

Admission control: at most `num_slots + max_queue` requests are outstanding (submitted and not
finished); `submit` beyond that raises `QueueFull` at once (the HTTP layer answers 429). After
`drain()` (SIGTERM), `submit` raises `Draining`; requests in flight run on until `grace_s` has
passed, then are cancelled, and the thread ends.

Engine failure: when an engine step raises, or its batched step fails (`StepOutput.fault`), the
engine is broken, not one request: the worker records `failure` (the reason), sets the
`readme_engine_healthy` gauge to 0, fails every request in flight or queued (status error),
admits nothing more (`submit` raises `EngineFailed`, a `Draining`), calls `on_failure(reason)`
(the server uses it to shut down and exit non-zero) and its thread ends. A request that fails
alone (its prompt's routing raised) is failed alone and the engine keeps serving.

Events passed to a request's sink, from the engine thread: ("token", token_id) for every
generated token as its step completes, then exactly one ("done", RequestResult) (status ok,
error or cancelled).

Service time (for the HTTP layer's Retry-After): `mean_service_s` is the mean wall time, in
seconds, from first token to finish of the last `SERVICE_WINDOW` requests that finished with at
least one token (ok or cancelled, not error); None before any has. It leaves out a request's
prefill, so it slightly underestimates how long a request holds its slot.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable

from readme_jax.model.sampling import SamplingParams
from readme_jax.serve.engine import CANCELLED, ERROR, Engine, RequestResult, ServeRequest
from readme_jax.serve.metrics import ServeMetrics

log = logging.getLogger(__name__)
Sink = Callable[[tuple[str, object]], None]
SERVICE_WINDOW = 32  # finished requests averaged into `mean_service_s`


class QueueFull(Exception):
    """The server holds `num_slots + max_queue` requests already."""


class Draining(Exception):
    """The server is shutting down and admits no new request."""


class EngineFailed(Draining):
    """The engine failed (see the module docstring); the message says why."""


@dataclasses.dataclass
class _Entry:
    sink: Sink
    submitted: float
    first_token: float | None = None
    last_token: float | None = None


class EngineWorker:
    """Runs `engine` on a daemon thread; see the module docstring."""

    def __init__(self, engine: Engine, max_queue: int = 64, metrics: ServeMetrics | None = None):
        self.engine, self.max_queue = engine, max_queue
        self.capacity = engine.cfg.num_slots + max_queue
        self.metrics = metrics or ServeMetrics()
        self._inbox: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._outstanding = 0
        self._ids = itertools.count()
        self._entries: dict[int, _Entry] = {}
        self._drain_deadline: float | None = None
        self._stopped = threading.Event()
        self._service: collections.deque[float] = collections.deque(maxlen=SERVICE_WINDOW)
        self.mean_service_s: float | None = None  # written by the engine thread only
        self.failure: str | None = None  # why the engine failed; None while it is healthy
        self.on_failure: Callable[[str], None] | None = None  # called once, engine thread
        self._thread = threading.Thread(target=self._loop, name="readme-engine", daemon=True)

    # ------------------------------------------------------------------ any thread

    def start(self) -> EngineWorker:
        self.engine.start()
        self._thread.start()
        return self

    @property
    def outstanding(self) -> int:
        return self._outstanding

    @property
    def draining(self) -> bool:
        return self._drain_deadline is not None

    def submit(
        self, prompt: list[int], max_tokens: int, sampling: SamplingParams, seed: int, sink: Sink
    ) -> int:
        """Queue a request; returns its id. Raises QueueFull or Draining."""
        with self._lock:
            if self.failure is not None:
                raise EngineFailed(f"the engine failed ({self.failure}); the server is stopping")
            if self._drain_deadline is not None or self._stopped.is_set():
                raise Draining("the server is shutting down")
            if self._outstanding >= self.capacity:
                raise QueueFull(
                    f"{self._outstanding} requests in flight or queued (request slots "
                    f"{self.engine.cfg.num_slots} + max_queue {self.max_queue})"
                )
            self._outstanding += 1
            rid = next(self._ids)
            req = ServeRequest(rid, list(prompt), max_tokens, sampling=sampling, seed=seed)
            # under the lock: a request admitted before a failure is in the inbox when the
            # engine thread fails what is queued
            self._inbox.put(("submit", req, sink, time.monotonic()))
        return rid

    def cancel(self, rid: int, reason: str = "cancelled") -> None:
        """Ask the engine thread to withdraw request `rid` (no-op if it has finished)."""
        self._inbox.put(("cancel", rid, reason))

    def drain(self, grace_s: float) -> None:
        """Stop admitting; cancel what is still running `grace_s` seconds from now."""
        with self._lock:
            if self._drain_deadline is None:
                self._drain_deadline = time.monotonic() + grace_s
        self._inbox.put(("wake",))

    def clear_service_times(self) -> None:
        """Forget the recorded service times (e.g. a warmup request's, which includes compiling);
        call while no request is in flight."""
        self._service.clear()
        self.mean_service_s = None

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread to end (after `drain`); True if it did."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # ------------------------------------------------------------------ engine thread

    def _loop(self) -> None:
        eng = self.engine
        while True:
            self._take_inbox(block=not eng.has_work)
            if self._drain_deadline is not None:
                if not eng.has_work and not self._entries:
                    break
                if time.monotonic() >= self._drain_deadline:
                    for rid in list(self._entries):
                        self._finish(eng.cancel(rid, "server shutting down"))
                    continue
            if not eng.has_work:
                self.metrics.idle()
                self.metrics.queue.set(0)
                self.metrics.running.set(0)
                continue
            try:
                out = eng.step()
            except Exception as err:  # noqa: BLE001 - the scheduler or backend broke
                log.exception("engine step failed; failing the requests in flight")
                self._fail(f"engine error: {err!r}")
                break
            self._deliver(out)
            if out.fault is not None:
                log.error("engine step failed: %s; failing the requests in flight", out.fault)
                self._fail(out.fault)
                break
        self._stopped.set()

    def _take_inbox(self, block: bool) -> None:
        try:
            msg = self._inbox.get(timeout=0.05) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(msg)
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, msg) -> None:
        if msg[0] == "submit":
            _, req, sink, t_sub = msg
            req.arrival_s = self.engine.now
            self._entries[req.id] = _Entry(sink, t_sub)
            self.engine.submit(req)
        elif msg[0] == "cancel":
            res = self.engine.cancel(msg[1], msg[2])
            if res is not None:
                self._finish(res)

    def _deliver(self, out) -> None:
        t = time.monotonic()
        m = self.metrics
        for rid, tok in out.tokens:
            e = self._entries.get(rid)
            if e is None:
                continue
            if e.last_token is None:
                m.ttft.observe(t - e.submitted)
                e.first_token = t
            else:
                m.itl.observe(t - e.last_token)
            e.last_token = t
            e.sink(("token", tok))
        for res in out.finished:
            self._finish(res)
        rec = out.record
        m.on_step(
            t,
            len(out.tokens),
            None if rec is None else len(rec["batch_experts"]),
            self.engine.cache_stats,
            getattr(self.engine.backend, "lookahead_stats", None),
        )
        m.queue.set(self.engine.num_waiting)
        m.running.set(self.engine.num_running)

    def _finish(self, res: RequestResult | None) -> None:
        if res is None:
            return
        e = self._entries.pop(res.id, None)
        if e is None:
            return
        status = "ok" if res.status not in (ERROR, CANCELLED) else res.status
        self.metrics.requests.labels(status).inc()
        if e.first_token is not None and status != ERROR:
            self._service.append(time.monotonic() - e.first_token)
            self.mean_service_s = sum(self._service) / len(self._service)
        with self._lock:
            self._outstanding -= 1
        e.sink(("done", res))

    def _fail(self, reason: str) -> None:
        """The engine is broken: admit nothing more, fail every request in flight or queued
        with `reason`, report it (gauge, `on_failure`)."""
        with self._lock:
            self.failure = reason
        self.metrics.healthy.set(0)
        while True:  # requests admitted but not yet handed to the engine
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                break
            if msg[0] == "submit":
                _, req, sink, t_sub = msg
                self._entries[req.id] = _Entry(sink, t_sub)
        for rid in list(self._entries):
            res = self.engine.cancel(rid) or RequestResult(rid, 0)
            res.status, res.error = ERROR, reason
            self._finish(res)
        if self.on_failure is not None:
            self.on_failure(reason)
