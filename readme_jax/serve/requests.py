"""A request's life in the serving engine: what a client submits (`ServeRequest`), its state
while it is served (`LiveRequest`), admission (`admit`: validate, route the prompt, or reject)
and the bookkeeping of each token it is given (`record_token`).

Dimension letters: the glossary in model/config.py (S prompt length, A experts per token).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from readme_jax.decode.steps import PromptError, validate_tokens
from readme_jax.model.sampling import SamplingParams
from readme_jax.serve import batching
from readme_jax.serve.results import ERROR, RequestResult


@dataclasses.dataclass
class ServeRequest:
    id: int
    prompt: Sequence[int]
    max_new_tokens: int
    arrival_s: float = 0.0
    sampling: SamplingParams = SamplingParams()
    seed: int = 0


@dataclasses.dataclass
class LiveRequest:
    """An admitted request: the scheduler's view, its prompt's routing, its result so far and
    its request slot (`row`, from its first prefill chunk until it finishes)."""

    req: ServeRequest
    sched: batching.Request
    prompt_experts: np.ndarray  # [S, A]
    prompt_weights: np.ndarray  # [S, A]
    res: RequestResult
    row: int | None = None
    done: int = 0  # prompt tokens prefilled
    next_experts: tuple[int, ...] = ()
    next_weights: tuple[float, ...] = ()

    @property
    def tokens(self) -> list[int]:
        return self.res.tokens


def admit(req: ServeRequest, step: int, backend, max_len: int) -> LiveRequest | RequestResult:
    """The request as served (its prompt routed by `backend`), or its error result when it
    cannot be served (no new tokens asked, token ids outside the vocabulary, or prompt +
    max_new_tokens beyond `max_len`)."""
    n = len(req.prompt)
    res = RequestResult(req.id, n, arrival_s=req.arrival_s, arrival_step=step)
    try:
        if req.max_new_tokens < 1:
            raise PromptError(f"max_new_tokens must be >= 1, got {req.max_new_tokens}")
        validate_tokens(req.prompt, backend.vocab_size, f"request {req.id} prompt")
        if n + req.max_new_tokens > max_len:
            raise PromptError(
                f"request {req.id}: prompt of {n} tokens + max_new_tokens="
                f"{req.max_new_tokens} = {n + req.max_new_tokens} exceeds the serving context "
                f"of {max_len} tokens (EngineConfig.max_len); shorten the prompt, lower "
                "max_new_tokens or raise max_len"
            )
    except PromptError as err:
        res.status, res.error = ERROR, str(err)
        res.finish_s, res.finish_step = req.arrival_s, step
        return res
    pe, pw = backend.route_prompt(req)
    res.prompt_experts, res.prompt_weights = pe.tolist(), pw.tolist()
    sched = batching.Request(
        req.id, n, req.max_new_tokens, arrival_step=step, prompt_experts=pe[:, 0].tolist()
    )
    return LiveRequest(req, sched, pe, pw, res)


def record_token(
    l: LiveRequest, tok: int, experts, weights, eos: set[int], include_eos: bool
) -> bool:
    """Give `l` its next sampled token (experts, weights [A]: its routing); returns whether the
    token is kept (shown to the client). At EOS or max_new_tokens the request is DONE (its
    finish_reason set), otherwise the token's experts are its next step's."""
    l.sched.generated += 1
    stop = tok in eos
    kept = not stop or include_eos
    if kept:
        l.res.tokens.append(tok)
        l.res.experts.append([int(e) for e in experts])
        l.res.weights.append([float(x) for x in weights])
    if stop or len(l.res.tokens) >= l.req.max_new_tokens:
        l.res.finish_reason = "eos" if stop else "length"
        l.sched.state = batching.DONE
    else:
        l.next_experts = tuple(int(e) for e in experts)
        l.next_weights = tuple(float(x) for x in weights)
        l.sched.next_expert = l.next_experts[0]
    return kept
