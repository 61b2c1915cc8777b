"""OpenAI-compatible HTTP server over the Read-ME serving engine (FastAPI + uvicorn).

  python launch/serve.py                                    # the newest trained Read-ME run
                                                            # of the default config (else an
                                                            # untrained on-the-fly conversion)
  python launch/serve.py --config.checkpoint=runs/smollm2_135m   # a Read-ME run directory
  python launch/serve.py --config.dense=True                # the dense SmolLM2, same engine
  python launch/serve.py --config.checkpoint=model.gguf     # any dense GGUF or HF directory
  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \
      -d '{"prompt": "Once upon a time", "max_tokens": 32, "temperature": 0}'

Config: configs/serve.py (override any field with --config.x=y). Binds 127.0.0.1:8000 by
default. SIGTERM stops admitting, lets in-flight requests finish for shutdown_grace_s, cancels
the rest and exits 0. When the engine fails, the requests in flight get their error, GET
/health answers 503, and the process stops with one line and exit status 1 (for a supervisor to
restart it).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from readme_jax import cli
from readme_jax.checkpoints import models
from readme_jax.checkpoints.errors import CheckpointError
from readme_jax.checkpoints.tokenizer import load_tokenizer
from readme_jax.model.config import ConfigError
from readme_jax.serve import batching
from readme_jax.serve.bench.models import default_model, load_serve_model
from readme_jax.serve.cache import POLICIES as CACHE_POLICIES
from readme_jax.serve.dense import dense_serve_params
from readme_jax.serve.engine import EngineConfig
from readme_jax.serve.server import build_server, check_listen, run_server
from readme_jax.serve.worker import EngineFailed
from readme_jax.testing import tiny_serve_model

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "serve.py"


def resolve_checkpoint(path: str) -> tuple[str, str]:
    """(kind, path): kind is readme | dense | tiny | bundled. Raises CheckpointError."""
    if path == "tiny":
        return "tiny", path
    if not path:
        return "bundled", path
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    for sub in ("moe_trained", "moe_init"):  # a run directory: its trained model first
        if models.exists(p / sub):
            p = p / sub
            break
    kind = models.discover(p).kind
    return ("readme" if kind == "readme_moe" else "dense"), str(p)


def load_model(c):
    """(ServeParams, tokenizer, description, default model name)."""
    kind, path = resolve_checkpoint(c.checkpoint)
    default_name = ""
    if kind == "bundled" and not c.dense:  # no checkpoint: a trained run, else say so
        found, line, default_name = default_model()
        print(f"[model] {line}", flush=True)
        if found is not None:
            kind, path = "readme", str(found)
    if kind == "tiny":
        sm = tiny_serve_model(seed=c.seed, vocab=49152)
        return sm.params, load_tokenizer(), sm.source + ", SmolLM2 tokenizer", "readme-tiny"
    if kind == "readme" or (kind == "bundled" and not c.dense):
        sm = load_serve_model(
            path or None,
            domains=c.domains,
            calib_sequences=c.calib_sequences,
            calib_len=c.calib_len,
            remain_rate=c.remain_rate,
            seed=c.seed,
        )
        name = default_name or "readme-" + Path(path).parent.name
        return sm.params, sm.tokenizer, sm.source, name
    cfg, params, tok = models.load_dense(path, seed=c.seed)
    src = (path or "bundled SmolLM2-135M-Instruct GGUF") + " (dense, served with no expert cache)"
    return (
        dense_serve_params(cfg, params, c.seed),
        tok,
        src,
        "dense-" + (Path(path).stem if path else "smollm2-135m"),
    )


def engine_config(c, sp) -> EngineConfig:
    if c.batching not in batching.POLICIES:
        raise ConfigError(f"batching must be one of {batching.POLICIES}, got {c.batching!r}")
    if c.cache_policy not in CACHE_POLICIES:
        raise ConfigError(f"cache_policy must be one of {sorted(CACHE_POLICIES)}")
    if c.max_experts < 0:
        raise ConfigError(f"max_experts must be >= 0 (0 = no expert cap), got {c.max_experts}")
    E, ctx = sp.num_experts, sp.rc.model.max_seq_len
    if c.max_len > ctx:
        raise ConfigError(f"max_len={c.max_len} exceeds the model context of {ctx} tokens")
    capacity = c.capacity or E
    policy = "all" if capacity >= E else c.cache_policy
    return EngineConfig(
        num_slots=c.num_slots,
        max_len=c.max_len,
        prefill_chunk=c.prefill_chunk,
        max_batch_tokens=c.max_batch_tokens,
        batching=c.batching,
        cache_policy=policy,
        capacity=min(capacity, E),
        prefetch=bool(c.prefetch) and policy != "all",
        max_wait=c.max_wait,
        max_experts=c.max_experts or None,
        policy_seed=c.seed,
        lookahead=bool(c.lookahead),
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    c = cli.parse_config(CONFIG, argv)
    check_listen(c.host, c.port)  # before the model loads: a bad port fails in seconds
    t0 = time.perf_counter()
    sp, tok, source, name = load_model(c)
    ecfg = engine_config(c, sp)
    print(f"[model] {source} ({time.perf_counter() - t0:.0f}s)", flush=True)
    e = ecfg
    print(
        f"[engine] {e.batching} batching, cache {e.cache_policy} C={e.capacity} of "
        f"E={sp.num_experts}{', prefetch' if e.prefetch else ''}; N={e.num_slots} slots, "
        f"context {e.max_len}, token budget {e.max_batch_tokens}, max_queue {c.max_queue}",
        flush=True,
    )
    srv = build_server(
        sp,
        tok,
        ecfg,
        model_name=c.model_name or name,
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
