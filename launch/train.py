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
import time
from pathlib import Path

from absl import app, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/smollm2_135m.py", "Run config (ml_collections); override with --config.x=y"
)
STAGES = ("calibrate", "refactor", "train", "eval")


def _stage_list(spec: str) -> list[str]:
    got = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [s for s in got if s not in STAGES]
    if bad:
        raise SystemExit(f"error: unknown stage(s) {bad}; choose from {', '.join(STAGES)}")
    return [s for s in STAGES if s in got]


def _init_distributed(c) -> None:
    """Join the processes of a multi-process run (train/distributed.py); only process 0 prints."""
    from readme_jax.train import distributed as dist

    try:
        how = dist.initialize(c)
    except dist.DistributedError as e:
        raise SystemExit(f"error: {e}") from None
    info = dist.describe()
    kv = ", ".join(f"{k}={v}" for k, v in info.items())
    print(f"[distributed] {how or 'single process'}: {kv}", flush=True)
    if not dist.is_primary():  # logs, metrics and reports come from process 0
        sys.stdout = open(os.devnull, "w")


def stage_calibrate_refactor(c, run: Path, stages: list[str]) -> None:
    from readme_jax.model.moe import MoEConfig
    from readme_jax.model.readme import ReadMEConfig
    from readme_jax.model.router import RouterConfig
    from readme_jax.refactor import convert as cv

    moe_dir = run / "moe_init"
    if c.resume and (moe_dir / "model.json").exists():
        print(f"[calibrate/refactor] {moe_dir} exists; skipping (resume)")
        return
    t0 = time.time()
    cfg, dense, tok = cv.load_dense(c.model.checkpoint, c.model.dtype, c.model.scan_layers, c.seed)
    print(
        f"[load] {c.model.checkpoint or 'SmolLM2-135M-Instruct (bundled GGUF)'}: "
        f"{cfg.param_count() / 1e6:.1f}M params, {time.time() - t0:.1f}s"
    )
    domains = cv.parse_domains(c.data.domains)
    recipe = {
        "checkpoint": c.model.checkpoint or "bundled:SmolLM2-135M-Instruct.Q4_1.gguf",
        "domains": c.data.domains,
        "num_sequences": c.calib.num_sequences,
        "seq_len": c.calib.seq_len,
        "split": c.calib.split,
        "seed": c.seed,
        "tokenizer": tok.name,
    }
    batches = cv.calibration_batches(
        domains,
        tok,
        c.calib.num_sequences,
        c.calib.seq_len,
        c.calib.split,
        c.data.cache or None,
        seed=c.seed,
    )
    if c.refactor.clustering:
        from readme_jax.refactor.cluster import cluster_stats
        from readme_jax.refactor.stats import ActivationStats

        k = c.refactor.num_clusters or len(domains)
        recipe["clusters"] = k
        if (run / "calib" / "stats.json").exists() and ActivationStats.load(
            run / "calib"
        ).recipe.get("clusters") == k:
            stats = ActivationStats.load(run / "calib")
        else:
            pooled = [b for bs in batches.values() for b in bs]
            stats = cluster_stats(dense, cfg, pooled, k, recipe, seed=c.seed)
            stats.save(run / "calib")
    else:
        stats = cv.calibrate(cfg, dense, batches, recipe, run / "calib")
    print(
        f"[calibrate] experts from {', '.join(stats.domains)}; tokens {stats.n_tokens} -> "
        f"{run / 'calib'}"
    )
    if "refactor" not in stages:
        return
    mcfg = MoEConfig(len(stats.domains), c.moe.top_k, c.moe.gate_scaling, c.moe.dispatch)
    rcfg = RouterConfig(c.router.dim, c.router.n_heads, c.router.ffn_dim)
    params, spec = cv.refactor(dense, cfg, stats, c.refactor.remain_rate, mcfg, rcfg, c.seed)
    rc = ReadMEConfig(cfg.replace(scan_layers=c.model.scan_layers), mcfg, rcfg)
    cv.save_readme(moe_dir, params, rc, spec, {"recipe": recipe, "stage": "refactor"})
    rep = cv.write_refactor_report(run / "reports", spec, stats, cfg.ffn_dim)
    sw = rep["shared_widths"]
    print(
        f"[refactor] shared channels per layer {min(sw)}-{max(sw)} of {cfg.ffn_dim}; active FFN "
        f"fraction {rep['active_ffn_fraction']:.3f}; MoE checkpoint -> {moe_dir}"
    )


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    pylogging.getLogger("jax").setLevel(pylogging.WARNING)
    c = _CONFIG.value
    stages = _stage_list(c.stages)
    run = Path(c.run_dir)
    if not c.dry_run:
        _init_distributed(c)
    from readme_jax.train import distributed as dist

    primary = dist.is_primary()
    run.mkdir(parents=True, exist_ok=True)
    if primary:
        (run / "config.json").write_text(json.dumps(c.to_dict(), indent=2, default=str))
    if c.dry_run:
        from readme_jax.train.dry_run import dry_run

        dry_run(c)
        return
    if ("calibrate" in stages or "refactor" in stages) and primary:  # one process writes
        stage_calibrate_refactor(c, run, stages)
    dist.barrier("refactor")
    if "train" in stages:
        from readme_jax.train.loop import run_training

        run_training(c, run)
    dist.barrier("done")
    if "eval" in stages and dist.describe()["process_count"] > 1:
        # evaluation is single-device: a long one would outlast the other processes' shutdown
        print("[eval] skipped in a multi-process run; run it as one process with "
              "--config.stages=eval on the same run_dir")  # fmt: skip
    elif "eval" in stages:
        from readme_jax.eval.pipeline import run_eval

        run_eval(c, run)
    print(f"done: {run}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    app.run(main)
