"""EleutherAI lm-evaluation-harness with readme_jax's model registered as "readme_jax".

  python launch/lm_harness.py --model readme_jax --model_args checkpoint=runs/smollm2_135m \
      --tasks readme_cloze,readme_mmlu --batch_size 8 --limit 100 --output_path runs/lm_eval
  python launch/lm_harness.py --model readme_jax --model_args checkpoint=m.gguf --tasks hellaswag

Every argument is lm_eval's own (`lm_eval run --help`). This script imports
`readme_jax.eval.harness` (which registers the model), adds `--include_path` naming the offline
tasks (readme_cloze, readme_mmlu: readme_jax/eval/tasks) unless one is given, and runs
lm_eval's CLI; `lm_eval` on its own never imports readme_jax. (It is not named lm_eval.py: a
script of that name would shadow the lm_eval package.) checkpoint: "" (the bundled SmolLM2), a
GGUF file, a Hugging Face directory, a Read-ME model directory, or a run directory (its trained
Read-ME).
"""

from __future__ import annotations

import os
import sys

from lm_eval.__main__ import cli_evaluate

import readme_jax.eval.harness  # noqa: F401  (registers --model readme_jax)
from readme_jax.eval.tasks import TASKS_DIR


def with_offline_tasks(argv: list[str]) -> list[str]:
    """argv with `--include_path` naming the project's task configs, unless one is given."""
    if any(a == "--include_path" or a.startswith("--include_path=") for a in argv):
        return argv
    return [*argv, "--include_path", str(TASKS_DIR)]


if __name__ == "__main__":
    # lm_eval's bootstrap standard errors fork a process pool unless told not to; forking a
    # process that runs JAX's threads can deadlock
    os.environ.setdefault("DISABLE_MULTIPROC", "1")
    if len(sys.argv) > 1 and sys.argv[1] not in ("-h", "--help"):
        sys.argv[1:] = with_offline_tasks(sys.argv[1:])
    cli_evaluate()
