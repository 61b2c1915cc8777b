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
import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

_CONFIG = config_flags.DEFINE_config_file("config", "configs/smollm2_135m.py", "Eval config.")
flags.DEFINE_string("checkpoint", None, "Run dir, model dir, .gguf file or HF directory.")
flags.DEFINE_string("out", None, "Output directory (default: the run dir).")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    from readme_jax.eval.pipeline import run_eval

    c = _CONFIG.value
    ck = Path(FLAGS.checkpoint) if FLAGS.checkpoint else None
    if ck is None:
        run, models = Path(FLAGS.out or c.run_dir), None
    elif not ck.exists():
        sys.exit(f"error: checkpoint not found: {ck}")
    elif (ck / "model.json").exists():
        run, models = Path(FLAGS.out or ck.parent), [ck]
        if (ck.parent / "config.json").exists():  # use the run's data/model settings
            saved = json.loads((ck.parent / "config.json").read_text())
            c.model.checkpoint = saved["model"]["checkpoint"]
            c.data.domains = saved["data"]["domains"]
    elif (ck / "config.json").exists() and any(ck.glob("*/model.json")):
        saved = json.loads((ck / "config.json").read_text())
        c.model.checkpoint = saved["model"]["checkpoint"]
        c.data.domains = saved["data"]["domains"]
        run, models = Path(FLAGS.out or ck), None
    else:  # a dense GGUF / HF checkpoint on its own
        c.model.checkpoint = str(ck)
        run, models = Path(FLAGS.out or "runs/eval_" + ck.stem), []
    run.mkdir(parents=True, exist_ok=True)
    run_eval(c, run, models)


if __name__ == "__main__":
    app.run(main)
