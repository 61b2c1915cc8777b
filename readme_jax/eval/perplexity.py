"""Sliding-window perplexity, bits per byte, and distillation fidelity (KL, top-1 agreement).

Windows follow the Hugging Face transformers doc "Perplexity of fixed-length models": window k
covers tokens [k*stride, min(k*stride + max_length, T)) and scores only the tokens after the end
of window k-1; the loop stops at the first window that reaches T. A window's first token has no
context and is never scored: with stride < max_length every token 1..T-1 is scored once (with at
least max_length - stride tokens of context after the first window); with stride == max_length
the windows are disjoint and each window's first token goes unscored, as in the doc. (The doc
multiplies each window's mean loss by `valid - batch_size`, one token short for overlapping
windows; we sum per-token NLLs, so totals are exact.)

Every result also keeps each window's mean NLL (nats per scored token) and its scored-token
count, in window order, so two models scored on the same windows can be compared pair by pair
(`eval/paired.py`).

A model is `logits_fn(params, tokens_BxS) -> logits_BxSxV`; `params` is any pytree (the MoE
passes its experts and router together). The log-softmax over V is reduced inside jit.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from readme_jax.model import llama
from readme_jax.model.config import LlamaConfig

LogitsFn = Callable[[Any, jax.Array], jax.Array]  # (params, tokens_BxS) -> logits_BxSxV


@dataclasses.dataclass(frozen=True)
class Window:
    """tokens[begin:end] go in; tokens[score_from:end] are scored."""

    begin: int
    end: int
    score_from: int


def sliding_windows(n_tokens: int, max_length: int, stride: int | None = None) -> list[Window]:
    """The HF doc's windows over a stream of n_tokens (stride defaults to max_length)."""
    stride = max_length if stride is None else stride
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be in [1, max_length={max_length}], got {stride}")
    if n_tokens < 2:
        raise ValueError(f"need at least 2 tokens to score, got {n_tokens}")
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_length, n_tokens)
        out.append(Window(begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n_tokens:
            break
    return out


def window_batches(
    tokens_T: np.ndarray, max_length: int, stride: int | None = None, batch_size: int = 8
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields (tokens_BxS, mask_BxS) with S = min(max_length, T) and a fixed B (one compile).

    mask[b, j] says token j of row b is scored (predicted from logits at j-1). Short windows and
    the final batch are right-padded with token 0 and mask 0; padding never precedes a scored
    token, so causal attention keeps it out of every score.
    """
    tokens_T = np.asarray(tokens_T)
    windows = sliding_windows(len(tokens_T), max_length, stride)
    S = min(max_length, len(tokens_T))
    for i in range(0, len(windows), batch_size):
        toks = np.zeros((batch_size, S), np.int32)
        mask = np.zeros((batch_size, S), bool)
        for b, w in enumerate(windows[i : i + batch_size]):
            toks[b, : w.end - w.begin] = tokens_T[w.begin : w.end]
            mask[b, w.score_from - w.begin : w.end - w.begin] = True
        yield toks, mask


def n_batches(n_tokens: int, max_length: int, stride: int | None, batch_size: int) -> int:
    return -(-len(sliding_windows(n_tokens, max_length, stride)) // batch_size)


# ---------------------------------------------------------------- models
@functools.cache
def dense_logits_fn(cfg: LlamaConfig) -> LogitsFn:
    """`logits_fn` for the dense Llama (cached per config so jit caches are shared)."""

    def logits_fn(params, tokens_BxS):
        return llama.forward(params, tokens_BxS, cfg)[0]

    return logits_fn


def _token_logprobs(logits_BxSxV, tokens_BxS):
    """log p(token j | < j) for j = 1..S-1, as [B, S-1] in f32 (no [B, S, V] log-softmax)."""
    logits = logits_BxSxV[:, :-1].astype(jnp.float32)
    picked = jnp.take_along_axis(logits, tokens_BxS[:, 1:, None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


@functools.cache
def make_nll_fn(logits_fn: LogitsFn) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """jit(params, tokens_BxS, mask_BxS) -> (NLL sum over each row's masked tokens [B], their
    count [B])."""

    @jax.jit
    def nll_fn(params, tokens_BxS, mask_BxS):
        lp = _token_logprobs(logits_fn(params, tokens_BxS), tokens_BxS)
        m = mask_BxS[:, 1:]
        return -jnp.sum(jnp.where(m, lp, 0.0), -1), jnp.sum(m, -1)

    return nll_fn


@functools.cache
def make_scored_fidelity_fn(teacher_fn: LogitsFn, student_fn: LogitsFn):
    """jit(t_params, s_params, tokens_BxS, mask_BxS) -> (student NLL sum [B], count [B],
    KL(t||s) sum, top-1 agreements): perplexity and fidelity from one student forward per
    batch."""

    @jax.jit
    def fn(t_params, s_params, tokens_BxS, mask_BxS):
        s_logits = student_fn(s_params, tokens_BxS)
        t_lp = jax.nn.log_softmax(teacher_fn(t_params, tokens_BxS)[:, :-1].astype(jnp.float32))
        s_lp = jax.nn.log_softmax(s_logits[:, :-1].astype(jnp.float32))
        nll_BxS = -jnp.take_along_axis(s_lp, tokens_BxS[:, 1:, None], axis=-1)[..., 0]
        kl_BxS = jnp.sum(jnp.exp(t_lp) * (t_lp - s_lp), axis=-1)
        agree_BxS = jnp.argmax(t_lp, -1) == jnp.argmax(s_lp, -1)
        m = mask_BxS[:, 1:]
        return (
            jnp.sum(jnp.where(m, nll_BxS, 0.0), -1),
            jnp.sum(m, -1),
            jnp.sum(jnp.where(m, kl_BxS, 0.0)),
            jnp.sum(m & agree_BxS),
        )

    return fn


# ---------------------------------------------------------------- results
class _WindowNLL:
    """Per-window NLL sums and counts, batch by batch; padding rows (no scored token) skipped."""

    def __init__(self):
        self.nll: list[float] = []
        self.count: list[int] = []

    def add(self, nll_B, count_B) -> tuple[float, int]:
        """Appends the batch's real windows; returns the batch's (NLL sum, count)."""
        nll, cnt = np.asarray(nll_B, np.float64), np.asarray(count_B, np.int64)
        keep = cnt > 0
        self.nll += nll[keep].tolist()
        self.count += cnt[keep].tolist()
        return float(nll.sum()), int(cnt.sum())

    def result(self, n_bytes: int | None) -> PerplexityResult:
        return PerplexityResult(
            float(np.sum(self.nll)),
            int(np.sum(self.count)),
            n_bytes,
            tuple(n / c for n, c in zip(self.nll, self.count, strict=True)),
            tuple(self.count),
        )


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    nll_sum: float  # nats
    n_tokens: int
    n_bytes: int | None = None
    window_nll: tuple[float, ...] = ()  # [N] mean NLL per scored token of each window, nats
    window_tokens: tuple[int, ...] = ()  # [N] scored tokens of each window

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.n_tokens

    @property
    def ppl(self) -> float:
        return math.exp(self.mean_nll)

    @property
    def bpb(self) -> float | None:
        """Bits per UTF-8 byte of the scored text (None without a byte count)."""
        return None if not self.n_bytes else self.nll_sum / math.log(2) / self.n_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "ppl": self.ppl,
            "bpb": self.bpb,
            "mean_nll": self.mean_nll,
            "nll_sum": self.nll_sum,
            "n_tokens": self.n_tokens,
            "n_bytes": self.n_bytes,
        } | (
            {"window_nll": list(self.window_nll), "window_tokens": list(self.window_tokens)}
            if self.window_nll
            else {}
        )


@dataclasses.dataclass(frozen=True)
class FidelityResult:
    kl_sum: float  # nats
    n_agree: int
    n_tokens: int

    @property
    def kl(self) -> float:
        """Mean KL(teacher || model) per scored token, nats."""
        return self.kl_sum / self.n_tokens

    @property
    def top1_agreement(self) -> float:
        return self.n_agree / self.n_tokens

    def to_dict(self) -> dict[str, Any]:
        return {
            "kl": self.kl,
            "top1_agreement": self.top1_agreement,
            "kl_sum": self.kl_sum,
            "n_agree": self.n_agree,
            "n_tokens": self.n_tokens,
        }


def _check_tokens(tokens_T, vocab_size: int | None) -> np.ndarray:
    tokens_T = np.asarray(tokens_T)
    if tokens_T.ndim != 1:
        raise ValueError(f"expected a 1-D token stream, got shape {tokens_T.shape}")
    if vocab_size is not None and tokens_T.size and int(tokens_T.max()) >= vocab_size:
        raise ValueError(
            f"token id {int(tokens_T.max())} is outside the vocabulary [0, {vocab_size})"
        )
    return tokens_T


def _window_bar(tokens_T, max_length, stride, batch_size, progress, default_label):
    """The (tokens, mask) window batches of a stream, behind a progress bar."""
    return tqdm(
        window_batches(tokens_T, max_length, stride, batch_size),
        total=n_batches(len(tokens_T), max_length, stride, batch_size),
        desc=progress if isinstance(progress, str) else default_label,
        disable=not progress,
        unit="batch",
    )


def perplexity(
    logits_fn: LogitsFn,
    params: Any,
    tokens_T: np.ndarray,
    *,
    max_length: int,
    stride: int | None = None,
    batch_size: int = 8,
    n_bytes: int | None = None,
    vocab_size: int | None = None,
    progress: bool | str = True,
) -> PerplexityResult:
    """Sliding-window perplexity of one token stream. `n_bytes` (UTF-8 bytes of the text) adds
    bits per byte; `progress` may be a label for the bar."""
    tokens_T = _check_tokens(tokens_T, vocab_size)
    nll_fn = make_nll_fn(logits_fn)
    bar = _window_bar(tokens_T, max_length, stride, batch_size, progress, "perplexity")
    acc = _WindowNLL()
    nll_sum, count = 0.0, 0
    for toks, mask in bar:
        s, c = acc.add(*nll_fn(params, toks, mask))
        nll_sum, count = nll_sum + s, count + c
        bar.set_postfix(ppl=f"{math.exp(nll_sum / max(count, 1)):.3f}")
    return acc.result(n_bytes)


def fidelity(
    teacher_fn: LogitsFn,
    teacher_params: Any,
    student_fn: LogitsFn,
    student_params: Any,
    tokens_T: np.ndarray,
    *,
    max_length: int,
    stride: int | None = None,
    batch_size: int = 8,
    progress: bool | str = True,
) -> FidelityResult:
    """Mean KL(teacher || student) per token and top-1 agreement over the same windows and
    scored tokens as `perplexity`."""
    if progress is True:
        progress = "fidelity"
    win = dict(max_length=max_length, stride=stride, batch_size=batch_size, progress=progress)
    return perplexity_and_fidelity(
        teacher_fn, teacher_params, student_fn, student_params, tokens_T, **win
    )[1]


def perplexity_and_fidelity(
    teacher_fn: LogitsFn,
    teacher_params: Any,
    student_fn: LogitsFn,
    student_params: Any,
    tokens_T: np.ndarray,
    *,
    max_length: int,
    stride: int | None = None,
    batch_size: int = 8,
    n_bytes: int | None = None,
    vocab_size: int | None = None,
    progress: bool | str = True,
) -> tuple[PerplexityResult, FidelityResult]:
    """`perplexity` of the student and its `fidelity` to the teacher in one pass over the
    windows: one student and one teacher forward per batch instead of two student forwards."""
    tokens_T = _check_tokens(tokens_T, vocab_size)
    fn = make_scored_fidelity_fn(teacher_fn, student_fn)
    bar = _window_bar(tokens_T, max_length, stride, batch_size, progress, "perplexity+KL")
    win = _WindowNLL()
    nll_sum, kl_sum, agree, count = 0.0, 0.0, 0, 0
    for toks, mask in bar:
        s_B, c_B, k, a = fn(teacher_params, student_params, toks, mask)
        s, c = win.add(s_B, c_B)
        nll_sum, count = nll_sum + s, count + c
        kl_sum, agree = kl_sum + float(k), agree + int(a)
        bar.set_postfix(
            ppl=f"{math.exp(nll_sum / max(count, 1)):.3f}", kl=f"{kl_sum / max(count, 1):.4f}"
        )
    return win.result(n_bytes), FidelityResult(kl_sum, agree, count)


# ---------------------------------------------------------------- many models, one teacher pass
def _teacher_rows(teacher_fn: LogitsFn, t_params, tokens_BxS, mask_BxS):
    """(teacher log-probs [B, S-1, V] f32, teacher NLL sum [B], count [B])."""
    t_lp = jax.nn.log_softmax(teacher_fn(t_params, tokens_BxS)[:, :-1].astype(jnp.float32))
    nll = -jnp.take_along_axis(t_lp, tokens_BxS[:, 1:, None], axis=-1)[..., 0]
    m = mask_BxS[:, 1:]
    return t_lp, jnp.sum(jnp.where(m, nll, 0.0), -1), jnp.sum(m, -1)


def _student_rows(student_fn: LogitsFn, s_params, t_lp, tokens_BxS, mask_BxS):
    """(student NLL sum [B], count [B], KL(t||s) sum, top-1 agreements) given the teacher's
    log-probs t_lp [B, S-1, V] of the same batch."""
    s_lp = jax.nn.log_softmax(student_fn(s_params, tokens_BxS)[:, :-1].astype(jnp.float32))
    nll_BxS = -jnp.take_along_axis(s_lp, tokens_BxS[:, 1:, None], axis=-1)[..., 0]
    kl_BxS = jnp.sum(jnp.exp(t_lp) * (t_lp - s_lp), axis=-1)
    agree_BxS = jnp.argmax(t_lp, -1) == jnp.argmax(s_lp, -1)
    m = mask_BxS[:, 1:]
    return (
        jnp.sum(jnp.where(m, nll_BxS, 0.0), -1),
        jnp.sum(m, -1),
        jnp.sum(jnp.where(m, kl_BxS, 0.0)),
        jnp.sum(m & agree_BxS),
    )


@functools.cache
def make_teacher_pass_fn(teacher_fn: LogitsFn):
    """jit(t_params, tokens_BxS, mask_BxS) -> (teacher log-probs [B, S-1, V] f32, teacher NLL
    sum, count): computed once per batch and reused for every student's KL."""

    @jax.jit
    def fn(t_params, tokens_BxS, mask_BxS):
        t_lp, nll_B, count_B = _teacher_rows(teacher_fn, t_params, tokens_BxS, mask_BxS)
        return t_lp, jnp.sum(nll_B), jnp.sum(count_B)

    return fn


@functools.cache
def make_student_vs_teacher_fn(student_fn: LogitsFn):
    """jit(s_params, t_lp [B, S-1, V], tokens_BxS, mask_BxS) -> (student NLL sum, count,
    KL(t||s) sum, top-1 agreements), given the teacher's log-probs of the same batch."""

    @jax.jit
    def fn(s_params, t_lp, tokens_BxS, mask_BxS):
        nll_B, count_B, kl, agree = _student_rows(student_fn, s_params, t_lp, tokens_BxS, mask_BxS)
        return jnp.sum(nll_B), jnp.sum(count_B), kl, agree

    return fn


@functools.cache
def _teacher_rows_fn(teacher_fn: LogitsFn):
    return jax.jit(functools.partial(_teacher_rows, teacher_fn))


@functools.cache
def _student_rows_fn(student_fn: LogitsFn):
    return jax.jit(functools.partial(_student_rows, student_fn))


def perplexity_and_fidelity_many(
    teacher_fn: LogitsFn,
    teacher_params: Any,
    students: dict[str, tuple[LogitsFn, Any]],
    tokens_T: np.ndarray,
    *,
    max_length: int,
    stride: int | None = None,
    batch_size: int = 8,
    n_bytes: int | None = None,
    vocab_size: int | None = None,
    progress: bool | str = True,
) -> tuple[PerplexityResult, dict[str, tuple[PerplexityResult, FidelityResult]]]:
    """The teacher's perplexity, and every student's perplexity and fidelity to it, over the
    same windows as `perplexity`: one teacher forward per batch whatever the number of students
    (the [B, S-1, V] teacher log-probs of a batch are reused for each student's KL and top-1
    agreement), so an evaluation of n models costs n + 1 forwards per batch instead of 2n.
    students: name -> (logits_fn, params). Results equal `perplexity_and_fidelity`'s per
    student."""
    tokens_T = _check_tokens(tokens_T, vocab_size)
    t_fn = _teacher_rows_fn(teacher_fn)
    s_fns = {k: _student_rows_fn(fn) for k, (fn, _) in students.items()}
    bar = _window_bar(tokens_T, max_length, stride, batch_size, progress, "perplexity+KL")
    t_win = _WindowNLL()
    wins = {k: _WindowNLL() for k in students}
    acc = {k: [0.0, 0] for k in students}  # KL sum, top-1 agreements
    for toks, mask in bar:
        t_lp, s_B, c_B = t_fn(teacher_params, toks, mask)
        t_win.add(s_B, c_B)
        for k, (_, p) in students.items():
            s_B, c_B, kl, agree = s_fns[k](p, t_lp, toks, mask)
            wins[k].add(s_B, c_B)
            acc[k] = [acc[k][0] + float(kl), acc[k][1] + int(agree)]
        del t_lp
    out = {}
    for k, (kl, agree) in acc.items():
        r = wins[k].result(n_bytes)
        out[k] = (r, FidelityResult(kl, agree, r.n_tokens))
    return t_win.result(n_bytes), out
