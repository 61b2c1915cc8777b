"""The one served-model door: what `launch/serve.py`, `launch/generate.py` and the serving
benchmarks serve, from a checkpoint string or nothing.

  sm = load_served("runs/smollm2_135m")        # a run directory: moe_trained, else moe_init
  sm = load_served("path/to/model.gguf")       # a dense checkpoint, as a one-expert MoE
  sm = load_served(None)                       # the default (below); sm.note says which
  sm = load_served(None, dense=True)           # the bundled dense SmolLM2

The default is the newest trained Read-ME run of the default config under `runs/`, else the
bundled SmolLM2 refactored on the fly by `refactor.pipeline.build_readme(recipe)` (activation
statistics on a few calibration sequences per domain, cached under the cache directory; its
router is untrained, so it has lost the teacher's chat skills and its model id says so).
"tiny" is a random 2-layer Read-ME model with the SmolLM2 tokenizer (smoke tests).

This module sits above the rooms (like `api.py`): the serving runtime (`serve/`) opens
checkpoints only and never imports `refactor/`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from readme_jax import cache_dir
from readme_jax.checkpoints import models
from readme_jax.checkpoints.tokenizer import load_tokenizer
from readme_jax.refactor.pipeline import Recipe, build_readme
from readme_jax.serve.model import ServeModel, default_trained_run, load_checkpoint, serve_model
from readme_jax.testing import tiny_serve_model

UNTRAINED_NAME = "readme-smollm2-135m-untrained"
TINY = "tiny"


def on_the_fly_recipe(
    domains: str | None = None,
    remain_rate: float = 0.5,
    calib_sequences: int | None = None,
    calib_len: int | None = None,
    seed: int = 0,
    checkpoint: str = "",
) -> Recipe:
    """The recipe of a model refactored at serving time: by default the default run config's
    (configs/smollm2_135m.py: the same domains, calibration, construction and refit, so the
    on-the-fly and the trained builds record the same recipe), select dispatch (the serving
    layout)."""
    base = Recipe()
    return Recipe(
        checkpoint=checkpoint,
        domains=domains or base.domains,
        num_sequences=calib_sequences or base.num_sequences,
        seq_len=calib_len or base.seq_len,
        split="train",
        seed=seed,
        remain_rate=remain_rate,
        dispatch="select",
    )


def _built_dir(recipe: Recipe) -> Path:
    """Where the on-the-fly build of `recipe` is kept (cache dir / serve / model-<hash>)."""
    rec = dataclasses.asdict(dataclasses.replace(recipe, dispatch="select", static_control=False))
    key = hashlib.sha256(json.dumps(rec, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return cache_dir.cache_root() / "serve" / f"model-{key}"


def build_on_the_fly(recipe: Recipe) -> ServeModel:
    """`build_readme(recipe)` split for serving, named UNTRAINED_NAME. The built model is kept in
    the cache directory: a second start with the same recipe loads it in seconds."""
    path = _built_dir(recipe)
    if models.exists(path):
        m = models.load_readme(path)
        tok = models.tokenizer_for(m.meta)
    else:
        built = build_readme(recipe, calib_root=cache_dir.cache_root() / "serve")
        built.save(path)
        m, tok = built.model, built.tokenizer
    n = m.spec.num_experts
    src = (
        f"{m.meta['recipe']['checkpoint']} refactored on the fly: {n} experts ({recipe.domains}), "
        f"remain rate {recipe.remain_rate}, statistics on {recipe.num_sequences} x "
        f"{recipe.seq_len} tokens per domain, refit; UNTRAINED router (kept in {path})"
    )
    return serve_model(m, tok, src, UNTRAINED_NAME)


def load_served(
    path: str | Path | None = None,
    *,
    dense: bool = False,
    recipe: Recipe | None = None,
    runs: str | Path = "runs",
    seed: int = 0,
) -> ServeModel:
    """The ServeModel for `path` (module doc): a run directory, a Read-ME or dense checkpoint,
    TINY, or None / "" for the default (`dense`: the bundled dense model instead; `recipe`: the
    on-the-fly build's, default `on_the_fly_recipe()`). With no path, `.note` is one line on
    what was chosen. Raises CheckpointError for a path that holds no model, ConfigError for a
    bad recipe."""
    if path == TINY:
        sm = tiny_serve_model(seed=seed, vocab=49152)
        sm.tokenizer, sm.name = load_tokenizer(), "readme-tiny"
        sm.source += ", SmolLM2 tokenizer"
        return sm
    if path:
        return load_checkpoint(path, seed)
    if dense:
        return load_checkpoint("", seed)
    found = default_trained_run(runs)
    if found is not None:
        sm = load_checkpoint(found, seed)
        sm.note = (
            f"no checkpoint given: serving {found}, the newest trained Read-ME run of the default "
            "config (give a checkpoint to choose another)"
        )
        return sm
    sm = build_on_the_fly(recipe or on_the_fly_recipe(seed=seed))
    sm.note = (
        f"no checkpoint given and no trained Read-ME run of the default config under {runs}/: "
        "serving an UNTRAINED on-the-fly conversion of SmolLM2 (untrained router; it has lost "
        "the teacher's chat skills). Train one with `make demo`."
    )
    return sm
