"""The loading of a servable Read-ME model (generation: `serve.engine.generate`).

  sm = load_serve_model("runs/smollm2_135m/moe_init")    # or None: build from SmolLM2
  out = engine.generate(sm.params, [ids], 64, capacity=2, cache_policy="belady")

`load_serve_model(None)` refactors the dense SmolLM2 itself (activation statistics on a few real
calibration sequences per default domain, cached; untrained router) until a trained Read-ME
checkpoint is given.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from readme_jax.serve.decode import ServeParams, split_params

DEFAULT_DOMAINS = "fiction,drama,code_docs,manual"


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
    from readme_jax.model.moe import MoEConfig
    from readme_jax.model.readme import ReadMEConfig
    from readme_jax.model.router import RouterConfig

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
    from readme_jax.model.config import LlamaConfig
    from readme_jax.model.moe import MoEConfig
    from readme_jax.model.readme import ReadMEConfig
    from readme_jax.model.router import RouterConfig
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
