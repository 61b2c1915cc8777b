"""Evaluate dense and Read-ME checkpoints: perplexity, fidelity, MMLU, routing; report with plots.

  python launch/eval.py --checkpoint runs/smollm2_135m            # every model in a run dir
  python launch/eval.py --checkpoint runs/smollm2_135m/moe_trained  # one model
  python launch/eval.py --config.eval.mmlu_limit=0 --config.eval.max_tokens_per_domain=4096
  python launch/eval.py --checkpoint path/to/model.gguf             # a dense model alone

Writes OUT/eval/results.json and OUT/eval/report.md (+ PNG plots), where OUT is the run dir (or
--out). Config keys are those of configs/smollm2_135m.py (`eval.*`, `data.*`, `model.*`).
"""

from __future__ import annotations

import json
from pathlib import Path

from absl import flags, logging

from readme_jax import cli
from readme_jax.checkpoints import models
from readme_jax.eval.pipeline import run_eval

_CONFIG = cli.define_config("configs/smollm2_135m.py", "Eval config.")
flags.DEFINE_string("checkpoint", None, "Run dir, model dir, .gguf file or HF directory.")
flags.DEFINE_string("out", None, "Output directory (default: the run dir).")
FLAGS = flags.FLAGS


def _use_run_settings(c, run: Path) -> None:
    """The data and model settings of the run that wrote `run` (its config.json)."""
    saved = json.loads((run / "config.json").read_text())
    c.model.checkpoint = saved["model"]["checkpoint"]
    c.data.domains = saved["data"]["domains"]
    c.data.extra_domains = saved["data"].get("extra_domains", "")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    c = _CONFIG.value
    ck = Path(FLAGS.checkpoint) if FLAGS.checkpoint else None
    if ck is None:
        run, todo = Path(FLAGS.out or c.run_dir), None
    elif ck.is_dir() and models.list_models(ck) and (ck / "config.json").exists():
        _use_run_settings(c, ck)  # a run directory: every model in it
        run, todo = Path(FLAGS.out or ck), None
    elif models.discover(ck).kind in ("readme_moe", "dense"):
        run, todo = Path(FLAGS.out or ck.parent), [ck]  # one model of a run
        if (ck.parent / "config.json").exists():
            _use_run_settings(c, ck.parent)
    else:  # a dense GGUF / HF checkpoint on its own
        c.model.checkpoint = str(ck)
        run, todo = Path(FLAGS.out or "runs/eval_" + ck.stem), []
    run.mkdir(parents=True, exist_ok=True)
    run_eval(c, run, todo)


if __name__ == "__main__":
    cli.run(main)
