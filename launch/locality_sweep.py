"""Locality sweep: router-only training at several `train.locality_weight`s (and optionally
several `train.domain_target`s: every pair is one point) from one refactored model, then
held-out perplexity against temporal locality, Belady hit ratio at C = E/2 and unique experts
per batch (one Pareto plot).

  python launch/locality_sweep.py --config.run=RUN --config.weights=0,0.5,2
  python launch/locality_sweep.py --config.run=RUN --config.weights=0,1 \
      --config.domain_targets=0,1 --config.router_steps=12

RUN holds `calib/` and `moe_init/` (launch/train.py stages calibrate,refactor). Each point gets
RUN_sweep/w<w>/ (w<w>_d<domain target>/ for a nonzero domain target) with links to both and
runs launch/train.py's `train` stage with rounds=1, router_steps, expert_steps=0 (the experts
stay as refactored: perplexity differences come from routing alone). Each point is measured by
readme_jax/serve/bench/locality.py. Settings: configs/locality_sweep.py.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

from readme_jax import cli
from readme_jax.checkpoints import models
from readme_jax.checkpoints.tokenizer import load_tokenizer
from readme_jax.model.config import ConfigError
from readme_jax.serve.bench import locality
from readme_jax.serve.bench.sim import cost_7b, validation_streams

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "locality_sweep.py"


def train_router(c, run: Path, w: str, dt: str) -> Path:
    """RUN_sweep/<point>/moe_trained after a router-only `train` stage (a subprocess)."""
    r = run.parent / f"{run.name}_sweep" / (f"w{w}" if float(dt) == 0 else f"w{w}_d{dt}")
    r.mkdir(parents=True, exist_ok=True)
    for sub in ("calib", "moe_init"):
        if not (r / sub).exists():
            (r / sub).symlink_to((run / sub).resolve())
    sets = dict(run_dir=r, stages="train", preset="demo", **{"train.rounds": 1})
    sets |= {"train.router_steps": c.router_steps, "train.expert_steps": 0}
    sets |= {"train.baselines": "none", "train.locality_weight": w, "train.domain_target": dt}
    cmd = [sys.executable, str(ROOT / "launch/train.py"), f"--config={c.train_config}"]
    subprocess.run(cmd + [f"--config.{k}={v}" for k, v in sets.items()], check=True)
    return r / "moe_trained"


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    c = cli.parse_config(CONFIG, argv)
    if not c.run:
        raise ConfigError("--config.run is required (a run directory with moe_init/)")
    run, out = Path(c.run), Path(c.out)
    if not (run / "moe_init").is_dir():
        raise ConfigError(f"{run}/moe_init is missing; run the calibrate,refactor stages first")
    init = models.load_readme(run / "moe_init")
    streams = validation_streams(init.spec.domains, load_tokenizer())
    mc = cost_7b(init.spec, init.rc)
    rows: list[dict] = []
    for w, dt in [(w, dt) for dt in cli.csv(c.domain_targets) for w in cli.csv(c.weights)]:
        ckpt = train_router(c, run, w, dt)
        point = {"weight": float(w), "domain_target": float(dt), "checkpoint": str(ckpt)}
        rows.append(point | locality.measure_point(ckpt, streams, mc, c.eval_tokens))
        print(json.dumps(rows[-1]), flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd = shlex.join(["python", "launch/locality_sweep.py", *argv])
        out.with_suffix(".json").write_text(json.dumps({"command": cmd, "rows": rows}, indent=1))
    if len(rows) > 1:
        locality.plot(rows, out.with_suffix(".png"))
    return rows


if __name__ == "__main__":
    cli.guarded(main)()
