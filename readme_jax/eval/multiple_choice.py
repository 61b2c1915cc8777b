"""MMLU-style multiple-choice scoring, as lm-eval-harness does it.

Each prompt ends in "Answer:" and the model picks the continuation among " A", " B", " C", " D"
with the highest log-likelihood. Context and continuation are split the way lm-eval's
`_encode_pair` does: encode(prompt + cont) minus the tokens of encode(prompt). When every
continuation is one token (SmolLM2: " A" -> [330]) a question costs one row and is read off the
last position; otherwise each choice gets its own row and its tokens' log-probs are summed.

Questions are records with `subject`, `question`, `choices` (4) and `answer` (0..3): dicts or
objects (e.g. `readme_jax.data.tasks.MCQuestion`). `prompt_fn(question) -> str` builds the
prompt; `lm_eval_prompt` is the 0-shot fallback, `data.tasks.kshot_prompt` gives k shots.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from readme_jax.eval.perplexity import LogitsFn

LETTERS = ("A", "B", "C", "D")
CONTINUATIONS = tuple(" " + c for c in LETTERS)


def _field(q: Any, name: str) -> Any:
    return q[name] if isinstance(q, dict) else getattr(q, name)


def lm_eval_prompt(q: Any) -> str:
    """lm-eval-harness's 0-shot MMLU prompt (`_default_template_yaml` + description)."""
    subject = str(_field(q, "subject")).replace("_", " ")
    choices = _field(q, "choices")
    lines = [str(_field(q, "question")).strip()]
    lines += [f"{letter}. {c}" for letter, c in zip(LETTERS, choices, strict=True)]
    head = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
    return head + "\n".join(lines) + "\nAnswer:"


def _split_trailing_space(context: str, continuation: str) -> tuple[str, str]:
    n = len(context) - len(context.rstrip(" "))  # lm-eval moves trailing spaces to the answer
    return (context[:-n], context[-n:] + continuation) if n else (context, continuation)


def encode_choices(
    tokenizer: Any, context: str, continuations: Sequence[str]
) -> tuple[list[int], list[list[int]]]:
    """(context ids, continuation ids per choice) as lm-eval-harness's `_encode_pair` splits
    them: encode(context + continuation) minus the context's own tokens."""
    ctx_text, _ = _split_trailing_space(context, "")
    ctx = tokenizer.encode(ctx_text)
    conts = []
    for c in continuations:
        _, cont_text = _split_trailing_space(context, c)
        whole = tokenizer.encode(ctx_text + cont_text)
        if whole[: len(ctx)] != ctx:  # BPE merged across the boundary; score the plain split
            conts.append(tokenizer.encode(cont_text, add_bos=False))
        else:
            conts.append(whole[len(ctx) :])
    return ctx, conts


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) for one continuation, as `encode_choices`."""
    ctx, (cont,) = encode_choices(tokenizer, context, [continuation])
    return ctx, cont


@dataclasses.dataclass
class _Row:
    tokens: list[int]
    positions: list[int]  # logits at p predict the target
    targets: list[int]
    choice: list[int]  # which choice each (position, target) pair belongs to
    question: int


def _rows_for(qi: int, ctx: list[int], conts: list[list[int]], max_len: int) -> list[_Row]:
    if all(len(c) == 1 for c in conts):
        ctx = ctx[-max_len:]
        p = len(ctx) - 1
        return [_Row(ctx, [p] * len(conts), [c[0] for c in conts], list(range(len(conts))), qi)]
    rows = []
    for ci, cont in enumerate(conts):
        toks = (ctx + cont)[-(max_len + 1) :][:-1]  # the last token is only a target
        start = len(toks) - len(cont) + 1
        rows.append(_Row(toks, list(range(start - 1, len(toks))), cont, [ci] * len(cont), qi))
    return rows


@functools.cache
def make_loglik_fn(logits_fn: LogitsFn):
    """jit(params, tokens_BxS, pos_BxN, tgt_BxN) -> log p(tgt | tokens[:pos+1]) as [B, N]."""

    @jax.jit
    def loglik(params, tokens_BxS, pos_BxN, tgt_BxN):
        logits_BxSxV = logits_fn(params, tokens_BxS)
        picked_BxNxV = jnp.take_along_axis(logits_BxSxV, pos_BxN[..., None], axis=1)
        logp = jax.nn.log_softmax(picked_BxNxV.astype(jnp.float32), axis=-1)
        return jnp.take_along_axis(logp, tgt_BxN[..., None], axis=-1)[..., 0]

    return loglik


def _bucket(n: int, m: int) -> int:
    """Smallest m * 2^k or 1.5 * m * 2^k >= n: at most ~1.5x padding, two compiles per octave."""
    b = m
    while True:
        if n <= b:
            return b
        if n <= b * 3 // 2:
            return b * 3 // 2
        b *= 2


def _score_rows(
    loglik, params, rows: list[_Row], shape, batch_size, max_len, pad_multiple, tqdm_kw
) -> np.ndarray:
    """Summed log-likelihood per (question, choice), batching rows of similar length."""
    scores = np.zeros(shape)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].tokens))
    n_pairs = max(len(r.targets) for r in rows)
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for chunk in tqdm(chunks, **tqdm_kw):
        S = min(_bucket(max(len(rows[i].tokens) for i in chunk), pad_multiple), max_len)
        toks = np.zeros((batch_size, S), np.int32)
        pos = np.zeros((batch_size, n_pairs), np.int32)
        tgt = np.zeros((batch_size, n_pairs), np.int32)
        for b, i in enumerate(chunk):
            r = rows[i]
            toks[b, : len(r.tokens)] = r.tokens
            pos[b, : len(r.positions)] = r.positions
            tgt[b, : len(r.targets)] = r.targets
        lp = np.asarray(loglik(params, toks, pos, tgt))
        for b, i in enumerate(chunk):
            r = rows[i]
            np.add.at(scores[r.question], r.choice, lp[b, : len(r.targets)])
    return scores


@dataclasses.dataclass(frozen=True)
class MCResult:
    per_subject: dict[str, dict[str, float]]  # subject -> {"correct", "n", "acc"}
    predictions: list[int]  # chosen choice per scored question, in input order
    answers: list[int]
    scores: list[list[float]]  # log-likelihood of each continuation, per question

    @property
    def n(self) -> int:
        return len(self.answers)

    @property
    def micro_acc(self) -> float:
        return float(np.mean(np.asarray(self.predictions) == np.asarray(self.answers)))

    @property
    def macro_acc(self) -> float:
        """Unweighted mean of per-subject accuracies (lm-eval's per-subject average)."""
        return float(np.mean([s["acc"] for s in self.per_subject.values()]))

    def to_dict(self) -> dict[str, Any]:
        return {
            "macro_acc": self.macro_acc,
            "micro_acc": self.micro_acc,
            "n": self.n,
            "per_subject": {k: dict(v) for k, v in sorted(self.per_subject.items())},
        }


def select(questions: Sequence[Any], limit: int | None = None) -> list[Any]:
    """The first `limit` questions of each subject (all when None), input order kept."""
    if limit is None:
        return list(questions)
    seen: dict[str, int] = defaultdict(int)
    out = []
    for q in questions:
        s = _field(q, "subject")
        if seen[s] < limit:
            seen[s] += 1
            out.append(q)
    return out


def score_multiple_choice(
    logits_fn: LogitsFn,
    params: Any,
    tokenizer: Any,
    questions: Sequence[Any],
    *,
    prompt_fn: Callable[[Any], str] = lm_eval_prompt,
    continuations: Sequence[str] = CONTINUATIONS,
    limit: int | None = None,
    batch_size: int = 8,
    max_len: int = 2048,
    pad_multiple: int = 64,
    progress: bool | str = True,
) -> MCResult:
    """Accuracy per subject of argmax log-likelihood over `continuations`.

    Prompts longer than `max_len` keep their last `max_len` tokens (lm-eval truncates on the
    left too). Rows are sorted by length and right-padded to `pad_multiple` times 1, 1.5, 2, 3,
    4, 6, ... so that few shapes compile.
    """
    qs = select(questions, limit)
    if not qs:
        raise ValueError("no questions to score")
    rows: list[_Row] = []
    for qi, q in enumerate(qs):
        rows += _rows_for(qi, *encode_choices(tokenizer, prompt_fn(q), continuations), max_len)
    desc = progress if isinstance(progress, str) else "multiple choice"
    shape = (len(qs), len(continuations))
    scores = _score_rows(
        make_loglik_fn(logits_fn),
        params,
        rows,
        shape,
        batch_size,
        max_len,
        pad_multiple,
        tqdm_kw={"desc": desc, "disable": not progress, "unit": "batch"},
    )
    preds = [int(p) for p in scores.argmax(-1)]
    answers = [int(_field(q, "answer")) for q in qs]
    per: dict[str, dict[str, float]] = defaultdict(lambda: {"correct": 0, "n": 0, "acc": 0.0})
    for q, p, a in zip(qs, preds, answers, strict=True):
        s = per[_field(q, "subject")]
        s["correct"] += int(p == a)
        s["n"] += 1
    for s in per.values():
        s["acc"] = s["correct"] / s["n"]
    return MCResult(dict(per), preds, answers, scores.tolist())
