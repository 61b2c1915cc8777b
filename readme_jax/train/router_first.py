"""Router first, experts around it: the construction that beat same-width static pruning at
remain rate 0.5 (docs/logbook/construction.md, "The shared core with every calibration row in
the refit": -8.4% held-out NLL against the static control after 24,576 expert tokens).

  train_router_first(c, run)   # RUN/route/ (k-means experts + a router trained toward them);
                               # then c routes by that router and trains with it frozen

1. RUN/route/: the calibration tokens clustered by k-means over their FFN activations
   (`refactor.clustering`, `refactor.num_clusters` experts), experts built on the clusters
   (the intersection rule, refit on 8 rows per domain: the settings the measured router was
   trained with), and `refactor.router_first_steps` router steps toward them (Eq. 4's target,
   `train.target_temperature`; no domain label), no expert phase.
2. The run's own refactor stage then groups the calibration tokens by that router's choice
   (`refactor.cluster_router`), builds the experts around its partition with the run's
   construction (e.g. `refactor.shared=core`) and refit, and starts from that router; the
   train stage keeps it frozen (`train.router_steps = 0`): routes the router reaches by
   construction, experts fit to them.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import readme_jax.train.distributed as dist
from readme_jax.checkpoints import models
from readme_jax.model.config import ConfigError
from readme_jax.refactor.stage import calibrate_and_refactor
from readme_jax.train.config import resolve
from readme_jax.train.loop import run_training

# the route stage's own experts: those the measured router was trained toward (the magnitude
# score, whatever the run's own construction uses)
ROUTE_REFACTOR = {
    "score": "magnitude",
    "shared": "intersection",
    "calib_sequences": 8,
    "cluster_router": "",
}


def route_dir(run: str | Path) -> Path:
    """The route stage's run directory (module doc, step 1) of run directory `run`."""
    return Path(run) / "route"


def _check(c: Any) -> int:
    """refactor.router_first_steps, checked: ConfigError unless `c` clusters its experts."""
    steps = int(c.refactor.router_first_steps)
    if not c.refactor.clustering:
        raise ConfigError(
            f"refactor.router_first_steps={steps} trains a router over k-means clusters: set "
            "refactor.clustering=True (and refactor.num_clusters, e.g. 8)"
        )
    if steps < 0:
        raise ConfigError(f"refactor.router_first_steps={steps} is out of range: allowed >= 0")
    return steps


def route_config(c: Any, run: Path) -> Any:
    """The config of the route stage (module doc, step 1) for run config `c`. Raises
    ConfigError unless `c` clusters its experts (refactor.clustering=True)."""
    steps = _check(c)
    r = copy.deepcopy(c)
    r.run_dir = str(route_dir(run))
    r.refactor.router_first_steps = 0
    r.refactor.update(ROUTE_REFACTOR)
    r.train.update(rounds=1, router_steps=steps, expert_steps=0, baselines="none",
                   domain_target=0.0, snapshots="", save_router_snapshot=False)  # fmt: skip
    return r


def use_router_first(c: Any, run: str | Path) -> Path:
    """Point run config `c` at the route stage's router (no work): refactor.cluster_router =
    RUN/route/moe_trained, train.router_steps = 0 (the router trains in the route stage only,
    so no domain-label target either: train.domain_target = 0). Returns that directory. Raises
    ConfigError as `route_config`, and for the layer-wise baseline (its gates would not train)."""
    _check(c)
    out = route_dir(run) / "moe_trained"
    c.refactor.cluster_router = str(out)
    c.train.router_steps = 0
    c.train.domain_target = 0.0
    if "layerwise" in resolve(c).baselines:
        raise ConfigError(
            "train.baselines includes layerwise, whose gates train in the router phase, which "
            "refactor.router_first_steps turns off (train.router_steps=0): an untrained "
            "baseline. Use --config.train.baselines=static (or none)"
        )
    return out


def train_router_first(c: Any, run: str | Path, *, tokenizer=None, teacher=None) -> Path:
    """Step 1 of the module doc in RUN/route/ (skipped where done, with c.resume); `c` as
    `use_router_first` left it. Every process calls it (the router trains on all of them).
    Returns the router's model directory."""
    r = route_config(c, Path(run))
    out = route_dir(run) / "moe_trained"
    if not (c.resume and models.exists(out)):
        if dist.is_primary():
            calibrate_and_refactor(r, r.run_dir)
        dist.barrier("route refactor")
        run_training(r, Path(r.run_dir), tokenizer=tokenizer, teacher=teacher)
        dist.barrier("route trained")
    steps = c.refactor.router_first_steps
    print(f"[route] router trained first ({steps} steps over k-means clusters) -> {out}; "
          "the experts are built around it and trained with it frozen")  # fmt: skip
    return out
