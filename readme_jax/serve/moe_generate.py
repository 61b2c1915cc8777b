"""Read-ME generation through the serving engine (for `launch/generate.py --moe`), and the
loading of a servable Read-ME model.

  sm = load_serve_model("runs/smollm2_135m/moe_init")    # or None: build from SmolLM2
  out = generate_moe(sm.params, [ids], 64, capacity=2, cache_policy="belady")
  print(tokenizer.decode(out.tokens[0])); print(format_stats(out.stats))

`load_serve_model(None)` refactors the dense SmolLM2 itself (activation statistics on a few real
calibration sequences per default domain, cached; untrained router) until a trained Read-ME
checkpoint is given.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from readme_jax.model.sampling import SamplingParams
from readme_jax.serve.backend import ModelBackend
from readme_jax.serve.decode import ServeParams, split_params
from readme_jax.serve.engine import Engine, EngineConfig, RequestResult, ServeRequest

DEFAULT_DOMAINS = "fiction,drama,code_docs,manual"
GREEDY = SamplingParams()


@dataclasses.dataclass
class ServeModel:
    params: ServeParams
    tokenizer: Any
    source: str  # what was loaded or built, for reports
    spec: Any = None  # refactor.experts.ExpertSpec


def load_serve_model(
    checkpoint: str | Path | None = None,
    *,
    dense: str = "",
    domains: str = DEFAULT_DOMAINS,
    calib_sequences: int = 4,
    calib_len: int = 256,
    remain_rate: float = 0.5,
    work_dir: str | Path | None = None,
    seed: int = 0,
) -> ServeModel:
    """A Read-ME checkpoint directory (holding model.json, as written by launch/train.py), or
    None: refactor the dense model `dense` ("" = bundled SmolLM2) over `domains`."""
    from readme_jax.checkpoints.tokenizer import load_tokenizer
    from readme_jax.refactor import convert as cv

    if checkpoint:
        path = Path(checkpoint)
        if not (path / "model.json").exists():
            raise FileNotFoundError(
                f"{path} is not a Read-ME checkpoint (no model.json); pass the directory that "
                "launch/train.py wrote (e.g. runs/smollm2_135m/moe_init), or no checkpoint to "
                "refactor SmolLM2 on the fly"
            )
        m = cv.load_readme(path)
        ck = str(m.meta.get("recipe", {}).get("checkpoint", ""))
        tok_path = None if not ck or ck.startswith(("bundled:", "random:")) else ck
        return ServeModel(split_params(m.rc, m.params), load_tokenizer(tok_path), str(path), m.spec)
    from readme_jax.model.config import MoEConfig, ReadMEConfig, RouterConfig

    cfg, dense_params, tok = cv.load_dense(dense, seed=seed)
    doms = cv.parse_domains(domains)
    recipe = {
        "checkpoint": dense or "bundled:SmolLM2-135M-Instruct.Q4_1.gguf",
        "domains": domains,
        "num_sequences": calib_sequences,
        "seq_len": calib_len,
        "split": "train",
        "seed": seed,
        "tokenizer": tok.name,
    }
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(work_dir) if work_dir else Path.home() / ".cache" / "readme_jax" / "serve"
    batches = cv.calibration_batches(doms, tok, calib_sequences, calib_len, seed=seed)
    stats = cv.calibrate(cfg, dense_params, batches, recipe, root / f"calib-{key}")
    mcfg = MoEConfig(len(doms), dispatch="select")
    rcfg = RouterConfig()
    params, spec = cv.refactor(dense_params, cfg, stats, remain_rate, mcfg, rcfg, seed)
    rc = ReadMEConfig(cfg, mcfg, rcfg)
    src = (
        f"{recipe['checkpoint']} refactored on the fly: {len(doms)} experts ({domains}), remain "
        f"rate {remain_rate}, statistics on {calib_sequences} x {calib_len} tokens per domain, "
        "untrained router"
    )
    return ServeModel(split_params(rc, params), tok, src, spec)


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


def _np_init(shapes: dict, rng) -> dict:
    """Random params in NumPy (normal, std 0.02; norms at 1): no per-shape XLA compiles."""
    out = {}
    for k, v in shapes.items():
        if isinstance(v, dict):
            out[k] = _np_init(v, rng)
        elif "norm" in k:
            out[k] = np.ones(v, np.float32)
        else:
            out[k] = (0.02 * rng.standard_normal(v)).astype(np.float32)
    return out


def tiny_serve_model(num_experts: int = 4, seed: int = 0, *, vocab: int = 97) -> ServeModel:
    """A random tiny Read-ME model (2 layers, width 32) for tests and smoke runs."""
    from readme_jax.model import llama
    from readme_jax.model.config import LlamaConfig, MoEConfig, ReadMEConfig, RouterConfig
    from readme_jax.refactor import experts as ex

    cfg = LlamaConfig(
        vocab_size=vocab,
        dim=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        ffn_dim=48,
        max_seq_len=256,
        tie_embeddings=True,
        eos_ids=(2,),
        bos_id=1,
    )
    rc = ReadMEConfig(cfg, MoEConfig(num_experts, dispatch="select"), RouterConfig(16, 2, 32))
    rng = np.random.default_rng(seed)
    dense = _np_init(llama.param_shapes(cfg), rng)
    router = _np_init(llama.param_shapes(rc.router.backbone(cfg)), rng)
    router["head"] = (0.3 * rng.standard_normal((rc.router.dim, num_experts))).astype(np.float32)
    scores = rng.random((num_experts, cfg.n_layers, cfg.ffn_dim))
    spec = ex.build_expert_spec(scores, 0.5, [f"d{i}" for i in range(num_experts)])
    params = {"backbone": ex.build_moe_params(dense, spec), "router": router}
    return ServeModel(split_params(rc, params), None, f"random tiny model (seed {seed})", spec)
