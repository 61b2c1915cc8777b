"""Read-ME conversion and training: calibrate -> refactor -> train -> eval, in one run directory.

  python launch/train.py --config configs/smollm2_135m.py
  python launch/train.py --config configs/smollm2_135m.py --config.stages=calibrate,refactor \
      --config.refactor.remain_rate=0.75 --config.run_dir=runs/rr075
  python launch/train.py --config configs/llama2_7b.py --config.dry_run=True

Each stage is skipped when its output already exists in the run directory (delete it, or pass
--config.resume=False, to redo it). The same command runs on a laptop and on a TPU pod
(auto-detected on TPU pods, SLURM and Open MPI; or --config.distributed.coordinator=HOST:PORT
--config.distributed.num_processes=N --config.distributed.process_id=I; see README).
"""

from __future__ import annotations

import json
import logging as pylogging
import os
import sys
from pathlib import Path

from absl import logging

import readme_jax.train.distributed as dist
from readme_jax import cli
from readme_jax.checkpoints import models
from readme_jax.eval.pipeline import run_eval
from readme_jax.model.config import ConfigError
from readme_jax.refactor.pipeline import Recipe
from readme_jax.refactor.stage import calibrate_and_refactor
from readme_jax.train import config as train_config
from readme_jax.train.dry_run import dry_run
from readme_jax.train.loop import run_training
from readme_jax.train.router_first import train_router_first, use_router_first

_CONFIG = cli.define_config(
    "configs/smollm2_135m.py", "Run config (ml_collections); override with --config.x=y"
)
STAGES = ("calibrate", "refactor", "train", "eval")


def _stage_list(spec: str) -> list[str]:
    got = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [s for s in got if s not in STAGES]
    if bad:
        raise ConfigError(f"unknown stage(s) {bad}; choose from {', '.join(STAGES)}")
    return [s for s in STAGES if s in got]


def _init_distributed(c) -> None:
    """Join the processes of a multi-process run (train/distributed.py); only process 0 prints."""
    try:
        how = dist.initialize(c)
    except dist.DistributedError as e:
        raise SystemExit(f"error: {e}") from None
    kv = ", ".join(f"{k}={v}" for k, v in dist.describe().items())
    print(f"[distributed] {how or 'single process'}: {kv}", flush=True)
    if not dist.is_primary():  # logs, metrics and reports come from process 0
        sys.stdout = open(os.devnull, "w")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    pylogging.getLogger("jax").setLevel(pylogging.WARNING)
    c = _CONFIG.value
    stages = _stage_list(c.stages)
    run = Path(c.run_dir)
    if c.refactor.router_first_steps:  # the route stage's router, frozen in training
        use_router_first(c, run)
    Recipe.from_config(c)  # every value checked before any work: ConfigError naming the key
    train_config.resolve(c)
    if not c.dry_run:
        _init_distributed(c)
    primary = dist.is_primary()
    run.mkdir(parents=True, exist_ok=True)
    if primary:
        (run / "config.json").write_text(json.dumps(c.to_dict(), indent=2, default=str))
    if c.dry_run:
        dry_run(c)
        return
    if c.refactor.router_first_steps and "refactor" in stages:
        if not (c.resume and models.exists(run / "moe_init")):
            train_router_first(c, run)
    if ("calibrate" in stages or "refactor" in stages) and primary:  # one process writes
        calibrate_and_refactor(c, run, refactor="refactor" in stages)
    dist.barrier("refactor")
    if "train" in stages:
        run_training(c, run)
    dist.barrier("done")
    if "eval" in stages and dist.describe()["process_count"] > 1:
        # evaluation is single-device: a long one would outlast the other processes' shutdown
        print(
            "[eval] skipped in a multi-process run; run it as one process with "
            "--config.stages=eval on the same run_dir"
        )
    elif "eval" in stages:
        run_eval(c, run)
    print(f"done: {run}")


if __name__ == "__main__":
    cli.run(main)
