"""A servable model: the serving parameter split plus what reports need, from a checkpoint.

  sm = load_checkpoint("runs/smollm2_135m")          # a run dir: its moe_trained, else moe_init
  engine_backend = ModelBackend.for_config(sm.params, engine_cfg)

The runtime opens checkpoints only (`checkpoints/models.py`): a Read-ME model, or a dense one
served as a one-expert MoE (`serve/dense.py`). What to serve when no checkpoint is given (the
newest trained run of the default config, else a model refactored on the fly) is decided by
the one served-model door, `readme_jax.served.load_served`, which may also call `refactor/`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from readme_jax.checkpoints import models
from readme_jax.checkpoints.tokenizer import with_end_ids
from readme_jax.model.spec import ExpertSpec
from readme_jax.serve.decode import ServeParams, split_params
from readme_jax.serve.dense import dense_serve_params

RUN_MODELS = ("moe_trained", "moe_init")  # a run directory serves its first existing one
DEFAULT_CONFIG_NAME = "smollm2_135m"  # configs/smollm2_135m.py's c.name


@dataclasses.dataclass
class ServeModel:
    params: ServeParams
    tokenizer: Any  # checkpoints.tokenizer.Tokenizer, or None for random test models
    source: str  # what was loaded or built, for reports
    spec: ExpertSpec | None = None
    name: str = ""  # the model id a server reports ("" = the caller names it)
    note: str = ""  # one line on why this model was chosen (set when none was asked for)


def serve_model(m: models.ReadMEModel, tokenizer: Any, source: str, name: str = "") -> ServeModel:
    """The serving split of a loaded or freshly built Read-ME model. The engine stops on
    rc.model.eos_ids, so every end id the tokenizer declares is added there."""
    rc = m.rc if tokenizer is None else m.rc.replace(model=with_end_ids(m.rc.model, tokenizer))
    return ServeModel(split_params(rc, m.params), tokenizer, source, m.spec, name)


def resolve(checkpoint: str | Path) -> tuple[str, str]:
    """(kind, checkpoint) of a checkpoint string: kind "readme" (a Read-ME model, or a run
    directory's moe_trained / moe_init, which the returned string then names) or "dense" (a
    dense GGUF, HF or project directory, "random:..." or "" for the bundled model). Raises
    CheckpointError when nothing servable is there."""
    spec = str(checkpoint)
    p = Path(spec)
    if spec and p.is_dir():
        for sub in RUN_MODELS:
            if models.exists(p / sub):
                spec = str(p / sub)
                break
    kind = models.discover(spec).kind
    return ("readme" if kind == "readme_moe" else "dense"), spec


def model_id(kind: str, checkpoint: str) -> str:
    """readme-<run> for a run's model, readme-<dir> for another Read-ME checkpoint,
    dense-<stem> for a dense one (dense-smollm2-135m for the bundled model)."""
    p = Path(checkpoint)
    if kind == "dense":
        bundled = models.is_bundled(checkpoint)
        return "dense-" + ("smollm2-135m" if bundled else p.stem.partition(":")[0])
    return "readme-" + (p.parent.name if p.name in RUN_MODELS else p.name)


def load_checkpoint(checkpoint: str | Path, seed: int = 0) -> ServeModel:
    """A Read-ME or dense checkpoint (or a run directory; "" = the bundled dense model) with
    its tokenizer, named by `model_id`. `seed` seeds the dense adapter's unused router (and a
    random checkpoint). Raises CheckpointError."""
    kind, spec = resolve(checkpoint)
    if kind == "readme":
        m = models.load_readme(spec)
        return serve_model(m, models.tokenizer_for(m.meta), spec, model_id(kind, spec))
    cfg, params, tok = models.load_dense(spec, seed=seed)
    where = "bundled SmolLM2-135M-Instruct GGUF" if models.is_bundled(spec) else spec
    src = f"{where} (dense, served with no expert cache)"
    return ServeModel(dense_serve_params(cfg, params, seed), tok, src, None, model_id(kind, spec))


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
