"""Served models for the lab and the demo scripts: a Read-ME checkpoint, or (no checkpoint) the
dense model refactored on the fly through `refactor/pipeline.py:build_readme`.

`default_trained_run()` finds the newest trained Read-ME run of the default config (what
`launch/serve.py` and `launch/generate.py --moe` serve when given no checkpoint).
`load_serve_model(None)` refactors the dense SmolLM2 itself with the training recipe's
construction and least-squares refit (activation statistics on a few real calibration sequences
per default domain, cached under ~/.cache/readme_jax/serve) but an untrained router: a model that
loses the teacher's chat skills (docs/results.md), served only when no trained run exists.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from readme_jax.checkpoints import models
from readme_jax.refactor import reconstruct
from readme_jax.refactor.pipeline import DEFAULT_DOMAINS, Recipe, build_readme
from readme_jax.serve import model as served
from readme_jax.serve.model import ServeModel

CACHE_ROOT = Path.home() / ".cache" / "readme_jax" / "serve"
DEFAULT_CONFIG_NAME = "smollm2_135m"  # configs/smollm2_135m.py's c.name


def default_trained_run(runs: str | Path = "runs", name: str = DEFAULT_CONFIG_NAME) -> Path | None:
    """The newest RUN/moe_trained under `runs` whose run was made by the default config (its
    config.json has c.name == `name` and the bundled model), by the time it was written; None
    when there is none."""
    found = []
    for cfg in Path(runs).glob("*/config.json"):
        trained = cfg.parent / "moe_trained"
        if not models.exists(trained):
            continue
        try:
            c = json.loads(cfg.read_text())
        except (OSError, ValueError):
            continue
        if c.get("name") == name and not (c.get("model") or {}).get("checkpoint"):
            found.append((trained.stat().st_mtime, trained))
    return max(found)[1] if found else None


UNTRAINED_NAME = "readme-smollm2-135m-untrained"


def default_model(runs: str | Path = "runs") -> tuple[Path | None, str, str]:
    """What to serve when no checkpoint is given: (trained run's moe_trained or None for the
    untrained on-the-fly conversion, the one line that says which, the served model id)."""
    found = default_trained_run(runs)
    if found is not None:
        line = (
            f"no checkpoint given: serving {found}, the newest trained Read-ME run of the default "
            "config (give a checkpoint to choose another)"
        )
        return found, line, "readme-" + found.parent.name
    line = (
        f"no checkpoint given and no trained Read-ME run of the default config under {runs}/: "
        "serving an UNTRAINED on-the-fly conversion of SmolLM2 (untrained router; it has lost "
        "the teacher's chat skills). Train one with `make demo`."
    )
    return None, line, UNTRAINED_NAME


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
    source = models.load_dense(dense, recipe.dtype, recipe.scan_layers, seed)
    built = build_readme(recipe, calib_root=work_dir or CACHE_ROOT, source=source)
    m = built.model
    # the training recipe's refit (refactor.reconstruct = "lstsq", its default ridge)
    rcfg = reconstruct.ReconstructConfig()
    params = reconstruct.at_refactor(
        rcfg,
        source[1],
        source[0],
        m.params,
        m.spec,
        built.stats.mean_abs_ExLxF,
        recipe.batches(built.tokenizer),
        "",
        recipe.top_k,
        with_static=False,
    )
    n = m.spec.num_experts
    src = (
        f"{m.meta['recipe']['checkpoint']} refactored on the fly: {n} experts ({domains}), remain "
        f"rate {remain_rate}, statistics on {calib_sequences} x {calib_len} tokens per domain, "
        f"least-squares refit (ridge {rcfg.ridge}), UNTRAINED router"
    )
    return served.serve_model(dataclasses.replace(m, params=params), built.tokenizer, src)
