"""Batched generation with a jitted prefill and a jitted decode step that donates its cache.

The model is abstracted as two functions so that the dense Llama and the Read-ME MoE share this
loop: `step(params, tokens_BxS, cache, num_new_B) -> (logits_BxSxV, cache)` and
`new_cache(batch, max_len) -> cache`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from readme_jax.model import llama
from readme_jax.model.config import LlamaConfig
from readme_jax.model.sampling import SamplingParams, sample_uniform

GREEDY = SamplingParams()


class PromptError(ValueError):
    """A prompt that the model cannot take (too long, empty, out-of-range token ids)."""


def validate_tokens(ids: Sequence[int], vocab_size: int, what: str = "prompt") -> None:
    if len(ids) == 0:
        raise PromptError(f"{what} is empty")
    arr = np.asarray(ids)
    bad = np.flatnonzero((arr < 0) | (arr >= vocab_size))
    if bad.size:
        i = int(bad[0])
        raise PromptError(
            f"{what} has token id {int(arr[i])} at position {i}, outside the vocabulary "
            f"[0, {vocab_size})"
        )


@dataclasses.dataclass(frozen=True)
class HostRouted:
    """A batch-1 decode whose expert the host picks (Read-ME's pre-gating: a token's route is
    known before the token enters the backbone, so the step can be handed that expert's weights
    instead of switching between experts inside the graph).

    split(prepared params) -> (common, [expert params per expert])
    step(common, expert, tokens_Bx1, cache) -> (logits, cache): the backbone only
    route(common, tokens_Bx1, cache) -> (expert_B int32, cache): routes the new tokens and appends
        them to the router's cache (which then runs one token ahead of the backbone's)."""

    split: Callable[[Any], tuple[Any, list[Any]]]
    step: Callable[..., tuple[jax.Array, Any]]
    route: Callable[..., tuple[jax.Array, Any]]


@dataclasses.dataclass(frozen=True)
class DecodeModel:
    """What the generation loop needs from a model. step(params, tokens_BxS, cache, num_new_B,
    last_B=None) -> (logits, cache): logits [B, S, V], or [B, 1, V] at positions last_B."""

    cfg: LlamaConfig
    step: Callable[..., tuple[jax.Array, Any]]
    new_cache: Callable[[int, int], Any]
    prepare: Callable[[Any], Any] = llama.unstack_layers  # params -> decode layout
    host_routed: HostRouted | None = None  # batch-1 path with the expert picked on the host


def dense_model(cfg: LlamaConfig) -> DecodeModel:
    def step(params, tokens_BxS, cache, num_new_B, last_B=None):
        logits, cache, _ = llama.forward(
            params, tokens_BxS, cfg, cache=cache, num_new_B=num_new_B, last_B=last_B
        )
        return logits, cache

    # the unrolled decode keeps one KV array per layer (see llama.init_cache)
    per_layer = not cfg.scan_layers
    return DecodeModel(cfg, step, lambda b, t: llama.init_cache(cfg, b, t, per_layer=per_layer))


def _bucket(n: int, m: int = 64) -> int:
    return -(-n // m) * m


class Generator:
    """Compiles prefill/decode once per (batch, lengths bucket) and runs the decode loop.

    host_routing (models with `host_routed`, batch 1): the host reads each token's expert id and
    hands the step that expert's weights, so the step is the plain dense step at the expert's
    width. The step alone is ~1 ms faster than the in-graph switch on XLA:CPU, but the host must
    wait for each step before dispatching the next (the default path overlaps them), and in the
    whole loop the two measured level (docs/benchmarks.md); so it is off by default."""

    def __init__(self, model: DecodeModel, params: Any, host_routing: bool = False):
        self.model = model
        # on device once: host (NumPy) params would be copied in on every jitted call
        self.params = jax.device_put(params if model.cfg.scan_layers else model.prepare(params))
        self._prefill = jax.jit(self._prefill_impl, static_argnames=("sp",))
        self._decode = jax.jit(self._decode_impl, static_argnames=("sp",), donate_argnums=(1,))
        self.host = model.host_routed if host_routing and not model.cfg.scan_layers else None
        self.host_steps = 0  # decode steps taken on the host-routed path
        if self.host is not None:
            self._common, self._experts = self.host.split(self.params)
            self._route = jax.jit(self.host.route, donate_argnums=(2,))
            self._decode_host = jax.jit(
                self._decode_host_impl, static_argnames=("sp",), donate_argnums=(2,)
            )

    def _prefill_impl(self, params, cache, tokens_BxS, n_B, key, sp):
        logits, cache = self.model.step(params, tokens_BxS, cache, n_B, n_B - 1)
        return sample_uniform(logits[:, 0], key, sp), cache

    def _decode_impl(self, params, cache, tok_B, key, sp):
        """(next token, cache, next key): the key is split on device, so a decode step is one
        dispatch with no host-side work."""
        key, sub = jax.random.split(key)
        logits, cache = self.model.step(params, tok_B[:, None], cache, None)
        return sample_uniform(logits[:, 0], sub, sp), cache, key

    def _decode_host_impl(self, common, expert, cache, tok_B, key, sp):
        """(next token, its expert, cache, next key) with the step's expert given."""
        key, sub = jax.random.split(key)
        logits, cache = self.host.step(common, expert, tok_B[:, None], cache)
        nxt = sample_uniform(logits[:, 0], sub, sp)
        e_B, cache = self.host.route(common, nxt[:, None], cache)
        return nxt, e_B, cache, key

    def stream(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        sampling: SamplingParams = GREEDY,
        seed: int = 0,
        eos_ids: Sequence[int] | None = None,
    ) -> Iterator[np.ndarray]:
        """Yield the next token of every row ([B] int array) until all rows stop.

        Rows that already hit EOS keep decoding (masked by the caller); the host reads token n
        only after step n+1 is dispatched, so there is no per-step device stall.
        """
        cfg = self.model.cfg
        if max_new_tokens < 1:
            raise PromptError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        for i, p in enumerate(prompts):
            validate_tokens(p, cfg.vocab_size, f"prompt {i}")
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens > cfg.max_seq_len:
            raise PromptError(
                f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the model "
                f"context of {cfg.max_seq_len} tokens; shorten the prompt or generate fewer tokens"
            )
        B = len(prompts)
        S = _bucket(longest, 16)
        T = min(_bucket(longest + max_new_tokens), cfg.max_seq_len)
        toks = np.zeros((B, S), np.int32)
        for i, p in enumerate(prompts):
            toks[i, : len(p)] = p
        n_B = jnp.asarray([len(p) for p in prompts], jnp.int32)
        key = jax.random.key(seed)
        cache = self.model.new_cache(B, T)
        key, sub = jax.random.split(key)
        tok, cache = self._prefill(self.params, cache, jnp.asarray(toks), n_B, sub, sampling)
        eos = set(cfg.eos_ids if eos_ids is None else eos_ids)
        done = np.zeros(B, bool)
        on_host = self.host is not None and B == 1
        if on_host:
            e_B, cache = self._route(self._common, tok[:, None], cache)
        for i in range(max_new_tokens):
            nxt = None
            if i + 1 < max_new_tokens and on_host:  # the expert id is read before the step
                expert = self._experts[int(np.asarray(e_B)[0])]
                nxt, e_B, cache, key = self._decode_host(
                    self._common, expert, cache, tok, key, sampling
                )
                self.host_steps += 1
            elif i + 1 < max_new_tokens:
                nxt, cache, key = self._decode(self.params, cache, tok, key, sampling)
            host = np.asarray(tok)
            yield host
            done |= np.isin(host, list(eos))
            if done.all() or nxt is None:
                return
            tok = nxt

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        sampling: SamplingParams = GREEDY,
        seed: int = 0,
        eos_ids: Sequence[int] | None = None,
        include_eos: bool = False,
    ) -> list[list[int]]:
        """New tokens per prompt, stopping at the first EOS (excluded unless include_eos)."""
        eos = set(self.model.cfg.eos_ids if eos_ids is None else eos_ids)
        outs: list[list[int]] = [[] for _ in prompts]
        stopped = [False] * len(prompts)
        for step_toks in self.stream(prompts, max_new_tokens, sampling, seed, eos_ids):
            for b, t in enumerate(step_toks.tolist()):
                if stopped[b]:
                    continue
                if t in eos:
                    stopped[b] = True
                    if include_eos:
                        outs[b].append(t)
                else:
                    outs[b].append(t)
        return outs


@partial(jax.jit, static_argnames=("cfg",))
def dense_logits(params, tokens_BxS, cfg):
    """Jitted dense forward: logits [B, S, V]."""
    return llama.forward(params, tokens_BxS, cfg)[0]


def greedy_by_reforward(params, cfg: LlamaConfig, prompt: Sequence[int], n: int) -> list[int]:
    """Reference greedy decoding that re-runs the full forward each step (no KV cache)."""
    ids = list(prompt)
    width = _bucket(len(prompt) + n, 16)  # one shape: causal masking makes right-padding inert
    for _ in range(n):
        row = np.zeros((1, width), np.int32)
        row[0, : len(ids)] = ids
        logits = dense_logits(params, jnp.asarray(row), cfg)
        ids.append(int(jnp.argmax(logits[0, len(ids) - 1])))
    return ids[len(prompt) :]
