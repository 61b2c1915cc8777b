"""A servable Read-ME model: the serving parameter split plus what reports need.

  sm = load_serve_model("runs/smollm2_135m/moe_trained")
  engine_backend = ModelBackend.for_config(sm.params, engine_cfg)

A model refactored on the fly (no checkpoint) is built by the lab, `serve/bench/models.py`, which
may import `refactor/`; the runtime only opens checkpoints (`checkpoints/models.py`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from readme_jax.checkpoints import models
from readme_jax.model.spec import ExpertSpec
from readme_jax.serve.decode import ServeParams, split_params


@dataclasses.dataclass
class ServeModel:
    params: ServeParams
    tokenizer: Any  # checkpoints.tokenizer.Tokenizer, or None for random test models
    source: str  # what was loaded or built, for reports
    spec: ExpertSpec | None = None


def serve_model(m: models.ReadMEModel, tokenizer: Any, source: str) -> ServeModel:
    """The serving split of a loaded or freshly built Read-ME model."""
    return ServeModel(split_params(m.rc, m.params), tokenizer, source, m.spec)


def load_serve_model(checkpoint: str | Path) -> ServeModel:
    """A Read-ME checkpoint directory (as written by launch/train.py) with its tokenizer.
    Raises CheckpointError if `checkpoint` holds no Read-ME MoE."""
    m = models.load_readme(checkpoint)
    return serve_model(m, models.tokenizer_for(m.meta), str(checkpoint))
