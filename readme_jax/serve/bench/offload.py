"""Expert bytes moved by the serving engine with C < E experts on device, by the form the
offloaded experts are stored and moved in (`ServeParams.quant`: f32, int8, bf16), side by side on
the same requests, and what the simulated accelerator (costmodel.py) makes of each run's own
schedule. `launch/bench_bytes.py` adds these rows to `make bench-bytes`.

  o = offload_bytes(sp, offload_prompts(8, 48, "heldout", "fiction", tok, V), 32, capacity=2)
  print("\n".join(render_offload(o)))
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from readme_jax.checkpoints.tokenizer import load_tokenizer
from readme_jax.data.pipeline import load_tokens
from readme_jax.serve.backend import ModelBackend
from readme_jax.serve.bench import costmodel as cm
from readme_jax.serve.config import EngineConfig
from readme_jax.serve.engine import Engine, ServeRequest


def sim_seconds(steps: list[dict], mc, pipelined: bool, profile: str = "a100") -> float:
    """Seconds a run's own schedule (`RunResult.steps`) takes on a simulated accelerator
    (serve/bench/costmodel.py) for the model costs `mc`."""
    clk, t = cm.CostClock(cm.PROFILES[profile](mc.layers), mc, pipelined), 0.0
    for st in steps:
        t += clk.duration(st, 0.0, t)
    return t


def offload_bytes(
    sp,
    prompts: Sequence[Sequence[int]],
    new_tokens: int,
    *,
    capacity: int = 2,
    modes: Sequence[str] = ("none", "int8"),
    policy: str = "belady",
    prefetch: bool = True,
) -> dict:
    """The serving engine with C = `capacity` of E experts on device, its offloaded experts
    stored and moved in each form of `modes` (`ServeParams.quant`), on the same requests (all
    arriving at once, greedy): expert bytes moved per generated token, loads, hit ratio,
    tokens equal to the first form's, and the simulated A100 seconds of each run's schedule
    (cost model at the served model's dims, and at Llama-2-7B dims with bf16 for f32)."""
    longest = max(len(p) for p in prompts)
    cfg = EngineConfig(
        num_slots=min(8, len(prompts)),
        max_len=longest + new_tokens + 1,
        max_batch_tokens=max(128, longest),
        cache_policy=policy,
        capacity=capacity,
        prefetch=prefetch,
    ).for_experts(sp.num_experts)
    reqs = [ServeRequest(i, list(p), new_tokens, seed=i) for i, p in enumerate(prompts)]
    out: dict[str, Any] = {"capacity": cfg.capacity, "num_experts": sp.num_experts}
    out |= {"policy": policy, "prefetch": prefetch, "new_tokens": new_tokens, "forms": {}}
    ref = None
    for m in modes:
        spm = dataclasses.replace(sp, quant=m)
        t = time.perf_counter()
        run = Engine(ModelBackend.for_config(spm, cfg), cfg).run(reqs)
        wall = time.perf_counter() - t
        s = run.summary()
        toks = [r.tokens for r in run.results]
        ref = toks if ref is None else ref
        mc = cm.model_cost(spm)
        big = cm.scaled_cost(mc, "Llama-2-7B dims", **cm.LLAMA2_7B)
        row = {k: s[k] for k in ("generated_tokens", "loads", "hits", "misses", "hit_ratio")}
        row |= {
            "bytes_per_expert": spm.bytes_per_expert,
            "bytes_moved": s["bytes_moved"],
            "bytes_per_token": s["bytes_per_token"],
            "same_tokens": sum(a == b for a, b in zip(toks, ref, strict=True)),
            "requests": len(reqs),
            "wall_s": wall,
            "a100_s": sim_seconds(run.steps, mc, prefetch),
            "a100_7b_s": sim_seconds(run.steps, big, prefetch),
            "a100_7b_bytes_per_expert": big.bytes_per_expert,
            # experts that the f32 run's C slots of device memory hold in this form
            "experts_in_f32_slots": mc.experts_in(cfg.capacity * sp.bytes_per_expert),
        }
        out["forms"][m] = row
    return out


def render_offload(o: dict) -> list[str]:
    """Markdown lines of `offload_bytes`' results."""
    f = o["forms"]
    ref = next(iter(f.values()))
    lines = [
        "",
        f"#### Offload engine: C = {o['capacity']} of {o['num_experts']} experts on device "
        f"({o['policy']}, {'prefetch' if o['prefetch'] else 'on demand'}; "
        f"{ref['requests']} {o.get('prompts', 'given')} prompts, "
        f"{o['new_tokens']} new tokens each)",
        "",
        "| experts stored and moved as | MB per expert | loads | hit ratio | expert MB moved "
        "per token (x fewer) | same tokens as f32 | A100 sim s (x faster) | A100 sim s, "
        "Llama-2-7B dims | experts in f32's C slots |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m, r in f.items():
        fewer = ref["bytes_per_token"] / r["bytes_per_token"] if r["bytes_per_token"] else 0.0
        name = {"none": "f32 (7B dims: bf16)", "int8": "int8", "bf16": "bf16"}.get(m, m)
        lines.append(
            f"| {name} | {r['bytes_per_expert'] / 1e6:.2f} | {r['loads']} | "
            f"{r['hit_ratio']:.1%} | {r['bytes_per_token'] / 1e6:.2f} ({fewer:.2f}x) | "
            f"{r['same_tokens']}/{r['requests']} | "
            f"{r['a100_s']:.4f} ({ref['a100_s'] / r['a100_s']:.2f}x) | "
            f"{r['a100_7b_s']:.3f} ({ref['a100_7b_s'] / r['a100_7b_s']:.2f}x) | "
            f"{r['experts_in_f32_slots']} |"
        )
    return lines


def offload_prompts(n: int, S: int, text: str, domain: str, tok, vocab: int) -> list[list[int]]:
    """`n` prompts of `S` tokens: windows spread over `domain`'s validation split (text
    "heldout", tokenized by `tok`, default SmolLM2's), or distinct id ramps ("synthetic", for
    tests and machines without the data)."""
    if text == "synthetic":
        return [[(1000 + 37 * i + j) % vocab for j in range(S)] for i in range(n)]
    stream = np.asarray(load_tokens(domain, "validation", tok or load_tokenizer()))
    starts = np.linspace(0, len(stream) - S, n).astype(int)
    return [stream[a : a + S].tolist() for a in starts]
