"""One streamed request alone: tokens/s through HTTP vs the engine's own decode speed, side by
side in one process on the same compiled backend (alternating, `--rounds` times each).

  python tools/stream_vs_engine.py --max_tokens 128              # SmolLM2 Read-ME on the fly
  python tools/stream_vs_engine.py --dense                       # the dense SmolLM2

Engine: `Engine.run` of the request alone; decode tok/s = decode tokens / duration of the
decode-only steps after the first (as `engine.generate` reports). HTTP: the same request streamed
(temperature 0) from a server on a loopback port; tok/s = (completion tokens - 1) / (time of
the last chunk - time of the first chunk), seen by the client. Engine config as in
configs/serve.py (N=8 slots, expert batching, Belady with C=2 and prefetch).
"""

from __future__ import annotations

import argparse
import json
import time

import httpx
import numpy as np

from readme_jax.checkpoints.models import load_dense
from readme_jax.serve.backend import ModelBackend
from readme_jax.serve.bench.models import load_serve_model
from readme_jax.serve.dense import dense_serve_params
from readme_jax.serve.engine import Engine, EngineConfig, ServeRequest
from readme_jax.serve.server import build_server

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def engine_rate(backend, cfg, ids, n) -> float:
    run = Engine(backend, cfg).run([ServeRequest(0, ids, n)])
    dec = [s for s in run.steps if not s["prefill"]][1:]
    return sum(len(s["decode"]) for s in dec) / sum(s["duration_s"] for s in dec)


def http_rate(url, model, ids, n) -> tuple[float, int]:
    body = {"model": model, "prompt": ids, "max_tokens": n, "temperature": 0, "stream": True}
    body["stream_options"] = {"include_usage": True}
    times, usage = [], None
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                ev = json.loads(line[6:])
                if ev["choices"] and ev["choices"][0]["text"]:
                    times.append(time.perf_counter())
                usage = ev.get("usage") or usage
    k = usage["completion_tokens"]
    return (k - 1) / (times[-1] - times[0]), k


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dense", action="store_true")
    p.add_argument("--max_tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    if args.dense:
        mcfg, params, tok = load_dense("")
        sp, name = dense_serve_params(mcfg, params), "dense SmolLM2-135M (bundled GGUF)"
    else:
        sm = load_serve_model(None)
        sp, tok, name = sm.params, sm.tokenizer, sm.source
    E = sp.num_experts
    C = min(2, E)
    cfg = EngineConfig(
        num_slots=8,
        max_len=256,
        prefill_chunk=32,
        max_batch_tokens=128,
        batching="expert",
        cache_policy="belady" if C < E else "all",
        capacity=C,
        prefetch=C < E,
    )
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": PROMPT}]))
    backend = ModelBackend.for_config(sp, cfg)
    engine_rate(backend, cfg, ids, 8)  # compile
    eng, web = [], []
    for _ in range(args.rounds):
        eng.append(engine_rate(backend, cfg, ids, args.max_tokens))
        srv = build_server(sp, tok, cfg, model_name="m", backend=backend)
        url = srv.start_in_thread()
        rate, k = http_rate(url, "m", ids, args.max_tokens)
        web.append(rate)
        srv.stop()
    out = {
        "model": name,
        "prompt_tokens": len(ids),
        "completion_tokens": k,
        "engine_decode_tok_s": eng,
        "http_stream_tok_s": web,
        "ratio_http_over_engine_median": float(np.median(web) / np.median(eng)),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
