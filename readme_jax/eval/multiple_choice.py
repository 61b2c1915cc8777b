"""MMLU-style multiple-choice scoring, as lm-eval-harness does it.

Each prompt ends in "Answer:" and the model picks the continuation among " A", " B", " C", " D"
with the highest log-likelihood. Context and continuation are split the way lm-eval's
`_encode_pair` does: encode(prompt + cont) minus the tokens of encode(prompt). When every
continuation is one token (SmolLM2: " A" -> [330]) a question costs one row and is read off the
last position; otherwise each choice gets its own row and its tokens' log-probs are summed.
`score_continuations` is the same scorer over arbitrary (context ids, continuation ids) pairs
(the lm-evaluation-harness model in `harness.py` uses it).

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
    out: list[int]  # the output slot (continuation) each (position, target) pair adds to


def _rows_for(ctx: list[int], conts: list[list[int]], outs: list[int], max_len: int) -> list[_Row]:
    """Rows scoring each continuation of one context: the one-token continuations share one
    row read off its last position; each longer one gets its own row. Context and
    continuation are cut on the left to fit max_len inputs (as lm-eval does)."""
    rows = []
    one = [i for i, c in enumerate(conts) if len(c) == 1]
    if one:
        ctx1 = ctx[-max_len:]
        p = len(ctx1) - 1
        rows.append(_Row(ctx1, [p] * len(one), [conts[i][0] for i in one], [outs[i] for i in one]))
    for ci, cont in enumerate(conts):
        if len(cont) == 1:
            continue
        if not 1 <= len(cont) <= max_len:
            raise ValueError(f"a continuation of {len(cont)} tokens; at most max_len={max_len}")
        toks = (ctx + cont)[-(max_len + 1) :][:-1]  # the last token is only a target
        start = len(toks) - len(cont) + 1
        rows.append(_Row(toks, list(range(start - 1, len(toks))), cont, [outs[ci]] * len(cont)))
    return rows


@functools.cache
def make_loglik_fn(logits_fn: LogitsFn):
    """jit(params, tokens_BxS, pos_BxN, tgt_BxN) -> (log p(tgt | tokens[:pos+1]) [B, N] f32,
    whether tgt is the argmax there [B, N] bool)."""

    @jax.jit
    def loglik(params, tokens_BxS, pos_BxN, tgt_BxN):
        logits_BxSxV = logits_fn(params, tokens_BxS)
        picked_BxNxV = jnp.take_along_axis(logits_BxSxV, pos_BxN[..., None], axis=1)
        logp_BxNxV = jax.nn.log_softmax(picked_BxNxV.astype(jnp.float32), axis=-1)
        lp_BxN = jnp.take_along_axis(logp_BxNxV, tgt_BxN[..., None], axis=-1)[..., 0]
        return lp_BxN, jnp.argmax(logp_BxNxV, axis=-1) == tgt_BxN

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
    loglik, params, rows: list[_Row], n_out, batch_size, max_len, pad_multiple, tqdm_kw
) -> tuple[np.ndarray, np.ndarray]:
    """(summed log-likelihood [n_out], all targets greedy [n_out]) per output slot, batching
    rows of similar length (B = batch_size, S and N bucketed so that compiles are reused)."""
    scores, greedy = np.zeros(n_out), np.ones(n_out, bool)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].tokens))
    n_pairs = _bucket(max(len(r.targets) for r in rows), 1)
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
        lp, top = (np.asarray(x) for x in loglik(params, toks, pos, tgt))
        for b, i in enumerate(chunk):
            r = rows[i]
            np.add.at(scores, r.out, lp[b, : len(r.targets)])
            np.logical_and.at(greedy, r.out, top[b, : len(r.targets)])
    return scores, greedy


def score_continuations(
    logits_fn: LogitsFn,
    params: Any,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    batch_size: int = 8,
    max_len: int = 2048,
    pad_multiple: int = 64,
    progress: bool | str = True,
) -> tuple[np.ndarray, np.ndarray]:
    """log p(continuation | context) for (context ids, continuation ids) pairs: the sum over
    the continuation's tokens [n] (nats, f64) and whether greedy decoding would produce it [n]
    (bool), as lm-eval's `loglikelihood` reports. One-token continuations of the same context
    share one forward. Inputs are cut on the left to `max_len` tokens; rows are right-padded
    to `pad_multiple` times 1, 1.5, 2, 3, ... so that few shapes compile. Raises ValueError for
    an empty context or continuation, or a continuation longer than max_len."""
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, (ctx, cont) in enumerate(pairs):
        if not ctx or not cont:
            raise ValueError(f"pair {i}: context and continuation must be non-empty")
        groups[tuple(ctx)].append(i)
    rows: list[_Row] = []
    for ctx, idx in groups.items():
        rows += _rows_for(list(ctx), [list(pairs[i][1]) for i in idx], idx, max_len)
    if not rows:
        return np.zeros(0), np.zeros(0, bool)
    desc = progress if isinstance(progress, str) else "loglikelihood"
    return _score_rows(
        make_loglik_fn(logits_fn),
        params,
        rows,
        len(pairs),
        batch_size,
        max_len,
        pad_multiple,
        tqdm_kw={"desc": desc, "disable": not progress, "unit": "batch"},
    )


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
    k = len(continuations)
    rows: list[_Row] = []
    for qi, q in enumerate(qs):
        ctx, conts = encode_choices(tokenizer, prompt_fn(q), continuations)
        rows += _rows_for(ctx, conts, list(range(qi * k, (qi + 1) * k)), max_len)
    desc = progress if isinstance(progress, str) else "multiple choice"
    scores, _ = _score_rows(
        make_loglik_fn(logits_fn),
        params,
        rows,
        len(qs) * k,
        batch_size,
        max_len,
        pad_multiple,
        tqdm_kw={"desc": desc, "disable": not progress, "unit": "batch"},
    )
    scores = scores.reshape(len(qs), k)
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
