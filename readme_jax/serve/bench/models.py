"""Served models for the lab and the demo scripts: a Read-ME checkpoint, or (no checkpoint) the
dense model refactored on the fly through `refactor/pipeline.py:build_readme`.

`load_serve_model(None)` refactors the dense SmolLM2 itself (activation statistics on a few real
calibration sequences per default domain, cached under ~/.cache/readme_jax/serve; untrained
router) until a trained Read-ME checkpoint is given.
"""

from __future__ import annotations

from pathlib import Path

from readme_jax.refactor.pipeline import DEFAULT_DOMAINS, Recipe, build_readme
from readme_jax.serve import model as served
from readme_jax.serve.model import ServeModel

CACHE_ROOT = Path.home() / ".cache" / "readme_jax" / "serve"


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
    if checkpoint:
        return served.load_serve_model(checkpoint)
    recipe = Recipe(
        checkpoint=dense,
        domains=domains,
        num_sequences=calib_sequences,
        seq_len=calib_len,
        split="train",
        seed=seed,
        remain_rate=remain_rate,
        dispatch="select",
    )
    built = build_readme(recipe, calib_root=work_dir or CACHE_ROOT)
    m = built.model
    n = m.spec.num_experts
    src = (
        f"{m.meta['recipe']['checkpoint']} refactored on the fly: {n} experts ({domains}), remain "
        f"rate {remain_rate}, statistics on {calib_sequences} x {calib_len} tokens per domain, "
        "untrained router"
    )
    return served.serve_model(m, built.tokenizer, src)
