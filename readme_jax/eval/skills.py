"""Does a converted model keep the teacher's skills? Two measurements next to perplexity.

1. **Fidelity on held-out teacher conversations, assistant tokens only**: the `chat` domain's
   held-out documents (data/chat.py: conversations the teacher wrote in its chat template),
   one conversation per row; KL(teacher || model) and top-1 agreement are counted on the
   tokens of the assistant's turn (its answer and the end-of-turn token after it), never on
   the system or user turns.
2. **The answer test**: a question set the project writes (`data/questions.jsonl`: short
   factual and instruction questions, each with accepted answers as case-insensitive regular
   expressions), asked through the chat template with greedy decoding. Per model: which
   questions it answers right, how many answers are empty, and the **retention**: the share of
   the questions the teacher answers right that the model answers right too (the paper reports
   retention against dense on downstream tasks, Read-ME Table 2).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

import readme_jax.data.pipeline as pipeline
from readme_jax.errors import UserError
from readme_jax.eval.perplexity import (
    LogitsFn,
    make_student_vs_teacher_fn,
    make_teacher_pass_fn,
)

QUESTIONS = Path(__file__).resolve().parent / "data" / "questions.jsonl"


class SkillsError(UserError, ValueError):
    """A question file or chat data that cannot be used; the message names what is wrong."""


# ---------------------------------------------------------------- the answer test
@dataclasses.dataclass(frozen=True)
class Question:
    id: str
    question: str
    accept: tuple[str, ...]  # regular expressions; a match anywhere (case-insensitive) is right

    def is_right(self, answer: str) -> bool:
        return any(re.search(p, answer, re.IGNORECASE) for p in self.accept)


def load_questions(path: str | Path = QUESTIONS) -> list[Question]:
    """The question set (JSONL of {"id", "question", "accept": [regex, ...]}). Raises
    SkillsError for a missing file, a malformed line, a bad regex or repeated ids."""
    path = Path(path)
    if not path.is_file():
        raise SkillsError(f"question file not found: {path}")
    out: list[Question] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            q = Question(str(row["id"]), str(row["question"]), tuple(row["accept"]))
            for p in q.accept:
                re.compile(p)
        except (json.JSONDecodeError, KeyError, TypeError, re.error) as e:
            raise SkillsError(f"{path}:{n}: not a question line ({e})") from None
        if not q.accept:
            raise SkillsError(f"{path}:{n}: question {q.id!r} accepts no answer")
        out.append(q)
    ids = [q.id for q in out]
    if len(set(ids)) != len(ids):
        raise SkillsError(f"{path}: repeated question ids")
    if not out:
        raise SkillsError(f"{path}: no questions")
    return out


@dataclasses.dataclass(frozen=True)
class AnswerResult:
    """One model's answers to the question set."""

    answers: dict[str, str]  # question id -> answer text
    right: dict[str, bool]

    @property
    def n_right(self) -> int:
        return sum(self.right.values())

    @property
    def n_empty(self) -> int:
        return sum(not a.strip() for a in self.answers.values())

    def retention(self, reference: AnswerResult) -> float | None:
        """Share of the questions `reference` answers right that this model answers right too
        (None when the reference gets none right)."""
        ref = [k for k, ok in reference.right.items() if ok]
        if not ref:
            return None
        return sum(self.right.get(k, False) for k in ref) / len(ref)

    def to_dict(self, reference: AnswerResult | None = None) -> dict[str, Any]:
        out = {
            "questions": len(self.answers),
            "right": self.n_right,
            "empty": self.n_empty,
            "answers": [
                {"id": k, "answer": a, "right": self.right[k]} for k, a in self.answers.items()
            ],
        }
        if reference is not None:
            out["retention"] = self.retention(reference)
            out["teacher_right"] = reference.n_right
            out["kept"] = sum(self.right[k] for k, ok in reference.right.items() if ok)
        return out


def score_answers(questions: Sequence[Question], answers: Sequence[str]) -> AnswerResult:
    """Scores answers (one per question, in order) against the accepted patterns."""
    if len(questions) != len(answers):
        raise SkillsError(f"{len(answers)} answers for {len(questions)} questions")
    ans = {q.id: a.strip() for q, a in zip(questions, answers, strict=True)}
    return AnswerResult(ans, {q.id: q.is_right(ans[q.id]) for q in questions})


# (prompt ids per question, max_new_tokens) -> generated ids per question (greedy, end token
# excluded); e.g. `lambda ps, n: loaded_model.generator().generate(ps, n)`
GenerateFn = Callable[[list[list[int]], int], list[list[int]]]


def answer_test(
    generate: GenerateFn,
    tokenizer: Any,
    questions: Sequence[Question],
    max_new_tokens: int = 48,
    batch_size: int = 25,
) -> AnswerResult:
    """Greedy chat answers of one model to `questions` (each the single user turn of the chat
    template), scored. Batches are padded to `batch_size` rows so that one compile serves all."""
    prompts = [tokenizer.encode_chat([{"role": "user", "content": q.question}]) for q in questions]
    outs: list[list[int]] = []
    for a in range(0, len(prompts), batch_size):
        rows = prompts[a : a + batch_size]
        n = len(rows)
        rows = rows + [rows[0]] * (batch_size - n)
        outs += generate(rows, max_new_tokens)[:n]
    return score_answers(questions, [tokenizer.decode(o, skip_special=True) for o in outs])


# ---------------------------------------------------------------- assistant-token fidelity
def assistant_header(tokenizer: Any) -> list[int]:
    """Token ids that open the assistant's turn in the chat template (what the generation
    prompt adds after a user turn), e.g. `<|im_start|>assistant\\n`. Raises SkillsError when the
    template adds nothing."""
    msgs = [{"role": "user", "content": "x"}]
    with_gen = tokenizer.encode_chat(msgs, add_generation_prompt=True)
    without = tokenizer.encode_chat(msgs, add_generation_prompt=False)
    k = 0
    while k < min(len(with_gen), len(without)) and with_gen[k] == without[k]:
        k += 1
    # the turn closer of the user message ("<|im_end|>\n") is in both; the header is what follows
    head = with_gen[len(without) :] if with_gen[: len(without)] == without else with_gen[k:]
    if not head:
        raise SkillsError(f"the chat template of {tokenizer.name} writes no assistant header")
    return list(head)


def assistant_mask(doc_T: np.ndarray, header: Sequence[int]) -> np.ndarray:
    """bool [T]: True on the tokens of the last assistant turn of one conversation (after the
    last occurrence of `header`, to the end: the answer and its end-of-turn token)."""
    doc = np.asarray(doc_T)
    h = np.asarray(header)
    T, n = len(doc), len(h)
    mask = np.zeros(T, bool)
    starts = [i for i in range(T - n + 1) if np.array_equal(doc[i : i + n], h)]
    if starts:
        mask[starts[-1] + n :] = True
    return mask


def conversation_rows(
    tokenizer: Any,
    split: str = "validation",
    max_len: int = 256,
    max_conversations: int | None = None,
    cache: str | Path | None = None,
    domain: str = "chat",
) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [N, S], mask [N, S]) of the chat domain's held-out conversations, one per row,
    right-padded with 0 (mask 0) or cut to S = `max_len`; mask marks the assistant tokens that
    are scored (token j predicted from j - 1). Raises SkillsError when no conversation has an
    assistant turn within `max_len` tokens."""
    toks = pipeline.load_tokens(domain, split, tokenizer, cache)
    offs = pipeline.load_offsets(domain, split, tokenizer, cache)
    header = assistant_header(tokenizer)
    rows, masks = [], []
    for a, b in zip(offs[:-1], offs[1:], strict=True):
        doc = np.asarray(toks[a:b], np.int32)[:max_len]
        m = assistant_mask(doc, header)
        if not m.any():
            continue
        t = np.zeros(max_len, np.int32)
        mm = np.zeros(max_len, bool)
        t[: len(doc)], mm[: len(doc)] = doc, m
        rows.append(t)
        masks.append(mm)
        if max_conversations and len(rows) >= max_conversations:
            break
    if not rows:
        raise SkillsError(
            f"no {domain!r} {split} conversation has an assistant turn within {max_len} tokens"
        )
    return np.stack(rows), np.stack(masks)


def chat_fidelity_many(
    teacher: tuple[LogitsFn, Any],
    students: dict[str, tuple[LogitsFn, Any]],
    tokens_NxS: np.ndarray,
    mask_NxS: np.ndarray,
    batch_size: int = 4,
) -> dict[str, dict[str, float]]:
    """Per student: KL(teacher || student) in nats per assistant token, top-1 agreement with
    the teacher, and the student's NLL per assistant token, over the masked tokens only; one
    teacher forward per batch (rows padded to `batch_size` with masked-out copies)."""
    t_fn = make_teacher_pass_fn(teacher[0])
    s_fns = {k: make_student_vs_teacher_fn(fn) for k, (fn, _) in students.items()}
    acc = {k: np.zeros(4) for k in students}
    N = len(tokens_NxS)
    for a in range(0, N, batch_size):
        t = tokens_NxS[a : a + batch_size]
        m = mask_NxS[a : a + batch_size]
        if len(t) < batch_size:
            pad = batch_size - len(t)
            t = np.concatenate([t, np.repeat(t[:1], pad, 0)])
            m = np.concatenate([m, np.zeros((pad, m.shape[1]), bool)])
        t_lp, _, _ = t_fn(teacher[1], t, m)
        for k, (_, p) in students.items():
            acc[k] += np.asarray([float(x) for x in s_fns[k](p, t_lp, t, m)])
        del t_lp
    out = {}
    for k, (nll, count, kl, agree) in acc.items():
        out[k] = {
            "tokens": int(count),
            "kl": kl / max(count, 1),
            "top1_agreement": agree / max(count, 1),
            "nll": nll / max(count, 1),
        }
    return out
