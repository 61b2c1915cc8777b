"""OpenAI-compatible HTTP server over the Read-ME serving engine (FastAPI + uvicorn).

  python launch/serve.py                                    # the newest trained Read-ME run
                                                            # of the default config (else an
                                                            # untrained on-the-fly conversion)
  python launch/serve.py --config.checkpoint=runs/smollm2_135m   # a Read-ME run directory
  python launch/serve.py --config.dense=True                # the dense SmolLM2, same engine
  python launch/serve.py --config.checkpoint=model.gguf     # any dense GGUF or HF directory
  python launch/serve.py --config.engine.capacity=0         # every expert resident (no cache)
  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \
      -d '{"prompt": "Once upon a time", "max_tokens": 32, "temperature": 0}'

Config: configs/serve.py, its engine block configs/engine.py (override any field with
--config.x=y, --config.engine.x=y); the model from `readme_jax.served.load_served`. Binds
127.0.0.1:8000 by default. SIGTERM stops admitting, lets in-flight requests finish for
shutdown_grace_s, cancels the rest and exits 0. When the engine fails, the requests in flight
get their error, GET /health answers 503, and the process stops with one line and exit status 1
(for a supervisor to restart it).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from readme_jax import cli
from readme_jax.model.config import ConfigError
from readme_jax.serve.config import EngineConfig
from readme_jax.serve.server import build_server, check_listen, run_server
from readme_jax.serve.worker import EngineFailed
from readme_jax.served import load_served, on_the_fly_recipe

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "serve.py"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    c = cli.parse_config(CONFIG, argv)
    check_listen(c.host, c.port)  # before the model loads: a bad port fails in seconds
    t0 = time.perf_counter()
    recipe = on_the_fly_recipe(
        c.domains, c.remain_rate, c.calib_sequences, c.calib_len, c.seed, checkpoint=""
    )
    sm = load_served(c.checkpoint, dense=c.dense, recipe=recipe, seed=c.seed)
    if sm.note:
        print(f"[model] {sm.note}", flush=True)
    sp, E = sm.params, sm.params.num_experts
    ec = EngineConfig.from_config(c.engine).for_experts(E)
    if ec.max_len > sp.rc.model.max_seq_len:
        raise ConfigError(
            f"engine.max_len={ec.max_len} exceeds the model context of {sp.rc.model.max_seq_len} "
            "tokens"
        )
    print(f"[model] {sm.source} ({time.perf_counter() - t0:.0f}s)", flush=True)
    print(
        f"[engine] {ec.batching} batching, cache {ec.cache_policy} C={ec.capacity} of "
        f"E={E}{', prefetch' if ec.prefetch else ''}; N={ec.num_slots} slots, "
        f"context {ec.max_len}, token budget {ec.max_batch_tokens}, max_queue {c.max_queue}",
        flush=True,
    )
    srv = build_server(
        sp,
        sm.tokenizer,
        ec,
        model_name=c.model_name or sm.name,
        max_queue=c.max_queue,
        retry_after_s=c.retry_after_s,
        retry_after_max_s=c.retry_after_max_s,
        warmup=c.warmup,
    )
    print(f"[serve] model {srv.state.model_name!r} on http://{c.host}:{c.port}", flush=True)
    try:
        run_server(srv, c.host, c.port, c.shutdown_grace_s, c.log_level)
    except EngineFailed as e:  # not a user error, but one line: the step's traceback is logged
        sys.exit(f"error: {e}")
    print("[serve] stopped", flush=True)


if __name__ == "__main__":
    cli.guarded(main)()
