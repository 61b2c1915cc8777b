"""EleutherAI lm-evaluation-harness with readme_jax's model registered as "readme_jax".

  python launch/lm_harness.py --model readme_jax --model_args checkpoint=runs/smollm2_135m \
      --tasks readme_cloze --batch_size 8 --limit 100 --output_path runs/lm_eval
  python launch/lm_harness.py --model readme_jax --model_args checkpoint=model.gguf --tasks hellaswag

(Not named lm_eval.py: a script of that name would shadow the lm_eval package.) Every
argument is lm_eval's own (`lm_eval run --help`); this script only imports
`readme_jax.eval.harness` (which registers the model) and runs lm_eval's CLI. `lm_eval` on its
own never imports readme_jax. checkpoint: "" (the bundled SmolLM2), a GGUF file, a Hugging Face
directory, a Read-ME model directory, or a run directory (its trained Read-ME).
"""

from __future__ import annotations

from lm_eval.__main__ import cli_evaluate

import readme_jax.eval.harness  # noqa: F401  (registers --model readme_jax)

if __name__ == "__main__":
    cli_evaluate()
