"""Token log-probabilities for the HTTP API's `logprobs`, `top_logprobs` and `echo`.

`Scorer.score(ids)` runs the served model's own prefill step (decode/steps.py `readme_model`,
the in-graph experts in the decode layout, as the engine's all-resident path and the Generator
use) over a whole token sequence and reports, for every position after the first, the
log-probability of the token there and the TOP_MAX most likely tokens, from the log-softmax of
the raw logits: before temperature, top-k or top-p, as vLLM reports them. It is a scoring
pass beside the engine (the engine's steps return only the sampled token), run on the
handler's worker thread; its logits equal the engine's up to float rounding (different
shapes), so a greedy token is the top-1 of its reported alternatives.

Formats: `completion_logprobs` (the legacy completions object: tokens, token_logprobs,
top_logprobs, text_offset) and `chat_logprobs` (chat: content [{token, logprob, bytes,
top_logprobs}]).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from readme_jax.decode import steps
from readme_jax.model.config import ReadMEConfig

TOP_MAX = 20  # OpenAI's most top_logprobs (chat); completions allow at most 5


@dataclasses.dataclass(frozen=True)
class TokenLogprobs:
    """For ids[1:] of a scored sequence of S tokens: chosen [S-1] (nats), top_ids and top_lp
    [S-1, TOP_MAX], most likely first."""

    chosen: np.ndarray
    top_ids: np.ndarray
    top_lp: np.ndarray

    def tail(self, n: int) -> TokenLogprobs:
        """The last n positions."""
        return TokenLogprobs(*(x[len(x) - n :] for x in (self.chosen, self.top_ids, self.top_lp)))


def _bucket(n: int, m: int = 64) -> int:
    return -(-n // m) * m


@functools.cache
def _score_fn(rc: ReadMEConfig):
    model = steps.readme_model(rc)

    @jax.jit
    def fn(params, tok_1xS, n_1):
        cache = model.new_cache(1, tok_1xS.shape[1])
        logits_1xSxV, _ = model.step(params, tok_1xS, cache, n_1)
        lp_SxV = jax.nn.log_softmax(logits_1xSxV[0].astype(jnp.float32), axis=-1)
        chosen = jnp.take_along_axis(lp_SxV[:-1], tok_1xS[0, 1:, None], axis=-1)[:, 0]
        top_lp, top_ids = jax.lax.top_k(lp_SxV[:-1], TOP_MAX)
        return chosen, top_ids, top_lp

    return fn


class Scorer:
    """Log-probabilities of whole sequences under a served Read-ME model. `graph`: its params
    in the decode layout (`serve.decode.graph_params`), `max_len`: the longest sequence (M)."""

    def __init__(self, rc: ReadMEConfig, graph, max_len: int):
        self.rc, self.graph, self.max_len = rc, graph, max_len

    def score(self, ids: list[int]) -> TokenLogprobs:
        """TokenLogprobs of ids[1:] given the ids before each (S = len(ids) >= 1; S = 1
        gives empty arrays). Sequences are right-padded to a multiple of 64 tokens (capped at
        max_len) so that few shapes compile."""
        S = len(ids)
        if S < 2:
            z = np.zeros((0, TOP_MAX))
            return TokenLogprobs(np.zeros(0), z.astype(np.int32), z)
        width = min(_bucket(S), max(self.max_len, S))
        tok = np.zeros((1, width), np.int32)
        tok[0, :S] = ids
        out = _score_fn(self.rc)(self.graph, jnp.asarray(tok), jnp.asarray([S], jnp.int32))
        chosen, top_ids, top_lp = (np.asarray(x)[: S - 1] for x in out)
        return TokenLogprobs(chosen, top_ids, top_lp)


# ----------------------------------------------------------------------------- API formats


def _piece(tokenizer, i: int) -> str:
    return tokenizer.decode([int(i)])


def completion_logprobs(
    tokenizer, ids: list[int], lps: list, tops: list, n_top: int, start: int = 0
) -> dict:
    """The completions `logprobs` object for the tokens ids[start:] of a choice whose tokens are
    `ids`: their logprobs `lps` (None for the first prompt token) and alternatives `tops` ((top
    ids, top logprobs) or None per token), aligned with ids: {"tokens", "token_logprobs",
    "top_logprobs" ({token: logprob}, the n_top most likely; None when n_top is 0),
    "text_offset" (characters of decode(ids) before each token)}."""
    offsets = [len(tokenizer.decode(ids[:k])) for k in range(start, len(ids))]
    top_dicts = [
        None
        if t is None
        else {
            _piece(tokenizer, i): float(v) for i, v in zip(t[0][:n_top], t[1][:n_top], strict=True)
        }
        for t in tops[start:]
    ]
    return {
        "tokens": [_piece(tokenizer, i) for i in ids[start:]],
        "token_logprobs": [None if v is None else float(v) for v in lps[start:]],
        "top_logprobs": top_dicts if n_top > 0 else None,
        "text_offset": offsets,
    }


def completion_entries(lp: TokenLogprobs, first: bool = False) -> tuple[list, list]:
    """(lps, tops) for `completion_logprobs` from scored positions; first: prepend the first
    prompt token's None."""
    lps = [float(v) for v in lp.chosen]
    tops = list(zip(lp.top_ids, lp.top_lp, strict=True))
    return ([None] + lps, [None] + tops) if first else (lps, tops)


def chat_logprobs(tokenizer, ids: list[int], lp: TokenLogprobs, n_top: int) -> dict:
    """The chat `logprobs` object: {"content": [{token, logprob, bytes, top_logprobs}]}."""

    def entry(i, v) -> dict:
        s = _piece(tokenizer, i)
        return {"token": s, "logprob": float(v), "bytes": list(s.encode("utf-8"))}

    content = []
    for k, i in enumerate(ids):
        alts = [
            entry(a, b) for a, b in zip(lp.top_ids[k, :n_top], lp.top_lp[k, :n_top], strict=True)
        ]
        content.append(entry(i, lp.chosen[k]) | {"top_logprobs": alts})
    return {"content": content}
