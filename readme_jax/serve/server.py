"""Assemble and run the HTTP server: engine + engine thread + FastAPI app + uvicorn.

  srv = build_server(serve_params, tokenizer, EngineConfig(...), model_name="readme")
  run_server(srv, host="127.0.0.1", port=8000, grace_s=10)   # blocks; SIGTERM -> exit cleanly

`ServerHandle.start_in_thread(port)` runs uvicorn on a background thread (tests, benchmarks).
SIGTERM (or SIGINT): uvicorn stops accepting connections, the engine thread stops admitting
(new requests get 503) and lets in-flight requests finish for `grace_s` seconds, then cancels
what remains; `run_server` then returns normally (the process exits 0). When the engine fails
(`worker.py`), the requests in flight get their error, uvicorn shuts down the same way and
`run_server` raises `EngineFailed` (launch/serve.py exits 1), so that a supervisor restarts it.
"""

from __future__ import annotations

import dataclasses
import signal
import socket
import threading
import time

import uvicorn
from fastapi import FastAPI

from readme_jax.model.config import ConfigError
from readme_jax.model.sampling import SamplingParams
from readme_jax.serve.backend import ModelBackend
from readme_jax.serve.decode import ServeParams
from readme_jax.serve.engine import Engine, EngineConfig
from readme_jax.serve.http import ServerState, create_app
from readme_jax.serve.worker import EngineFailed, EngineWorker


@dataclasses.dataclass
class ServerHandle:
    app: FastAPI
    state: ServerState
    worker: EngineWorker
    server: uvicorn.Server | None = None
    thread: threading.Thread | None = None

    def start_in_thread(self, port: int = 0, host: str = "127.0.0.1") -> str:
        """Serve on a background thread; returns the base URL (port 0: a free port)."""
        port = port or free_port(host)
        cfg = uvicorn.Config(self.app, host=host, port=port, log_level="warning")
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError(f"the server on {host}:{port} failed to start")
            time.sleep(0.02)
        return f"http://{host}:{port}"

    def stop(self, grace_s: float = 5.0) -> None:
        self.worker.drain(grace_s)
        if self.server is not None:
            self.server.should_exit = True
            self.thread.join(grace_s + 10)
        self.worker.join(grace_s + 10)


def check_listen(host: str, port: int) -> None:
    """Raise ConfigError, in one line, unless a server can listen on (host, port): the port in
    [1, 65535] and the address bindable now (not in use, permitted, an address of this host).
    uvicorn would announce an out-of-range port as running and then hang."""
    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(f"port={port!r} is out of range: allowed 1-65535")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise ConfigError(f"host={host!r} is not an address of this machine: {e}") from None
    family, kind, proto, _, addr = infos[0]
    try:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            s.bind(addr)
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def build_server(
    sp: ServeParams,
    tokenizer,
    ecfg: EngineConfig,
    *,
    model_name: str,
    max_queue: int = 64,
    retry_after_s: int = 1,
    retry_after_max_s: int = 60,
    warmup: bool = False,
    backend=None,
) -> ServerHandle:
    """Engine on `sp` under `ecfg` (on `backend` if given, else a `ModelBackend`), its thread
    started, and the app. With `warmup`, one short request runs first so that the steps are
    compiled before the first client arrives. A 429's Retry-After lies in [retry_after_s,
    retry_after_max_s] seconds (`http.retry_after_estimate`); a 503's is retry_after_s."""
    if tokenizer is None:
        raise ValueError("the HTTP server needs a tokenizer (the model has none)")
    engine = Engine(backend or ModelBackend.for_config(sp, ecfg), ecfg)
    worker = EngineWorker(engine, max_queue).start()
    if warmup:
        _warmup(worker, tokenizer, ecfg)
    state = ServerState(
        worker,
        tokenizer,
        model_name,
        ecfg.max_len,
        retry_after_s,
        retry_after_max_s=retry_after_max_s,
    )
    return ServerHandle(create_app(state), state, worker)


def _warmup(worker: EngineWorker, tokenizer, ecfg: EngineConfig) -> None:
    """One request of a full prefill chunk plus a partial one, two decode steps; its service
    time (compiling included) is then forgotten, so it does not inflate Retry-After."""
    done = threading.Event()
    ids = (tokenizer.encode("Hello, world. " * 64) * 2)[: ecfg.prefill_chunk + 3]
    worker.submit(ids, 2, SamplingParams(), 0, lambda ev: ev[0] == "done" and done.set())
    done.wait()
    worker.clear_service_times()


class _GracefulServer(uvicorn.Server):
    """uvicorn.Server that drains the engine on SIGTERM/SIGINT and does not re-raise SIGTERM
    after its graceful shutdown (uvicorn would, which kills the process with status -15)."""

    def __init__(self, config: uvicorn.Config, worker: EngineWorker, grace_s: float):
        super().__init__(config)
        self.worker, self.grace_s = worker, grace_s

    def handle_exit(self, sig, frame) -> None:
        self.worker.drain(self.grace_s)
        super().handle_exit(sig, frame)
        captured = getattr(self, "_captured_signals", None)
        if sig == signal.SIGTERM and captured and captured[-1] == sig:
            captured.pop()


def run_server(
    srv: ServerHandle, host: str, port: int, grace_s: float, log_level: str = "info"
) -> None:
    """Serve until SIGTERM/SIGINT; returns after in-flight requests finished or were cancelled
    (at most `grace_s` seconds after the signal, plus connection teardown). Raises EngineFailed
    (after the same shutdown) when the engine failed while serving."""
    cfg = uvicorn.Config(
        srv.app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=int(grace_s) + 5,
    )
    server = _GracefulServer(cfg, srv.worker, grace_s)
    srv.server = server
    srv.worker.on_failure = lambda reason: setattr(server, "should_exit", True)
    if srv.worker.failure is None:  # a failure before this point: nothing to serve
        server.run()
    srv.worker.drain(0.0)
    srv.worker.join(grace_s + 5)
    if srv.worker.failure is not None:
        raise EngineFailed(f"the engine failed ({srv.worker.failure}); the server stopped")
