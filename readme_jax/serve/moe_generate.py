"""Read-ME generation through the serving engine (for `launch/generate.py --moe`).

sm = load_serve_model("runs/smollm2_135m/moe_init")    # serve/model.py (or serve/bench/models.py)
out = generate_moe(sm.params, [ids], 64, capacity=2, cache_policy="belady")
print(tokenizer.decode(out.tokens[0])); print(format_stats(out.stats))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from readme_jax.model.sampling import SamplingParams
from readme_jax.serve.backend import ModelBackend
from readme_jax.serve.decode import ServeParams
from readme_jax.serve.engine import Engine, EngineConfig, RequestResult, ServeRequest

GREEDY = SamplingParams()


@dataclasses.dataclass
class MoEGeneration:
    tokens: list[list[int]]
    results: list[RequestResult]
    stats: dict


def generate_moe(
    sp: ServeParams,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampling: SamplingParams = GREEDY,
    *,
    capacity: int | None = None,
    cache_policy: str = "belady",
    prefetch: bool = False,
    seed: int = 0,
    max_len: int | None = None,
    num_slots: int | None = None,
    prefill_chunk: int = 32,
    on_token: Callable[[int, int], None] | None = None,
    backend: ModelBackend | None = None,
) -> MoEGeneration:
    """Generate for every prompt (all arrive at once) with C = `capacity` expert slots
    (None: all resident). Prompt i's result is request i; errors (e.g. a prompt too long) are
    reported in `results[i].error` with empty tokens. `on_token(i, token)` streams."""
    E = sp.num_experts
    if capacity is None or capacity >= E:
        capacity, cache_policy = E, "all"
    longest = max(len(p) for p in prompts)
    if max_len is None:
        max_len = min(sp.rc.model.max_seq_len, -(-(longest + max_new_tokens) // 64) * 64)
    cfg = EngineConfig(
        num_slots=num_slots or min(8, len(prompts)),
        max_len=max_len,
        prefill_chunk=prefill_chunk,
        max_batch_tokens=max(128, longest),
        cache_policy=cache_policy,
        capacity=capacity,
        prefetch=prefetch,
    )
    backend = backend or ModelBackend.for_config(sp, cfg)
    reqs = [
        ServeRequest(i, list(p), max_new_tokens, sampling=sampling, seed=seed + i)
        for i, p in enumerate(prompts)
    ]
    run = Engine(backend, cfg).run(reqs, on_token=on_token)
    stats = run.summary() | {"capacity": capacity, "num_experts": E, "policy": cache_policy}
    stats["prefetch"] = prefetch
    # decode rate over decode-only steps, the first one (which compiles) left out
    dec = [st for st in run.steps if not st["prefill"]][1:]
    span = sum(st["duration_s"] for st in dec)
    stats["decode_tok_s"] = sum(len(st["decode"]) for st in dec) / span if span else float("nan")
    return MoEGeneration([r.tokens for r in run.results], run.results, stats)


def format_stats(stats: dict) -> str:
    """One line of expert-cache statistics for the end of a generation."""
    mb = stats["bytes_moved"] / 1e6
    return (
        f"[expert cache: {stats['policy']}, C={stats['capacity']} of E={stats['num_experts']}"
        f"{', prefetch' if stats.get('prefetch') else ''}; {stats['hits']} hits, "
        f"{stats['misses']} misses (hit ratio {100 * stats['hit_ratio']:.1f}%), {stats['loads']} "
        f"loads = {mb:.1f} MB moved ({stats['bytes_per_token'] / 1e6:.2f} MB/token); "
        f"{stats['steps']} steps, decode {stats['decode_tok_s']:.1f} tok/s]"
    )
