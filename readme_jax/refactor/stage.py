"""The calibrate and refactor stages of a run directory (`launch/train.py`):

  calibrate_and_refactor(c, run)                  # RUN/calib, RUN/moe_init, RUN/reports
  calibrate_and_refactor(c, run, refactor=False)  # RUN/calib only

`c` is a run config (configs/smollm2_135m.py). The stage is skipped when RUN/moe_init exists
and `c.resume` is set. One process runs it (the caller joins the others afterwards).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from readme_jax.checkpoints import models
from readme_jax.refactor.experts import write_refactor_report
from readme_jax.refactor.pipeline import Recipe, build_readme, calibrate_recipe, load_source


def calibrate_and_refactor(c: Any, run: str | Path, refactor: bool = True) -> None:
    """run/calib (statistics) and, with `refactor`, run/moe_init and run/reports. Raises
    ConfigError for a recipe that cannot build (`Recipe.from_config`) and the loaders' errors
    for a checkpoint that does not load."""
    run = Path(run)
    moe_dir = run / "moe_init"
    if c.resume and models.exists(moe_dir):
        print(f"[calibrate/refactor] {moe_dir} exists; skipping (resume)")
        return
    recipe = Recipe.from_config(c)
    t0 = time.time()
    source = load_source(recipe)
    print(
        f"[load] {c.model.checkpoint or 'SmolLM2-135M-Instruct (bundled GGUF)'}: "
        f"{source[0].param_count() / 1e6:.1f}M params, {time.time() - t0:.1f}s"
    )
    stats = calibrate_recipe(recipe, source, run / "calib")
    print(
        f"[calibrate] experts from {', '.join(stats.domains)}; tokens {stats.n_tokens} -> "
        f"{run / 'calib'}"
    )
    if not refactor:
        return
    built = build_readme(recipe, source=source, stats=stats)
    built.save(moe_dir)
    m = built.model
    F = source[0].ffn_dim
    rep = write_refactor_report(run / "reports", m.spec, stats.n_tokens, F)
    sw = rep["shared_widths"]
    print(
        f"[refactor] shared channels per layer {min(sw)}-{max(sw)} of {F}; active FFN "
        f"fraction {rep['active_ffn_fraction']:.3f}; MoE checkpoint -> {moe_dir}"
    )
