"""The static-batch Generator: a jitted prefill and a jitted decode step (donating its cache)
over a `steps.DecodeModel`, the dense Llama or Read-ME with its in-graph experts. The serving
engine is the other driver of the same step library (decode/steps.py)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from readme_jax.decode.steps import DecodeModel, PromptError, validate_tokens
from readme_jax.model import llama
from readme_jax.model.config import LlamaConfig
from readme_jax.model.sampling import SamplingParams, sample_uniform

GREEDY = SamplingParams()


def _bucket(n: int, m: int = 64) -> int:
    return -(-n // m) * m


class Generator:
    """Static-batch driver over the step library: compiles prefill/decode once per (batch,
    lengths bucket) and runs the decode loop."""

    def __init__(self, model: DecodeModel, params: Any):
        self.model = model
        # on device once: host (NumPy) params would be copied in on every jitted call
        self.params = jax.device_put(model.prepare(params))
        self._prefill = jax.jit(self._prefill_impl, static_argnames=("sp",))
        self._decode = jax.jit(self._decode_impl, static_argnames=("sp",), donate_argnums=(1,))

    def _prefill_impl(self, params, cache, tokens_BxS, n_B, key, sp):
        logits, cache = self.model.step(params, tokens_BxS, cache, n_B, n_B - 1)
        return sample_uniform(logits[:, 0], key, sp), cache

    def _decode_impl(self, params, cache, tok_B, key, sp):
        """(next token, cache, next key): the key is split on device, so a decode step is one
        dispatch with no host-side work."""
        key, sub = jax.random.split(key)
        logits, cache = self.model.step(params, tok_B[:, None], cache, None)
        return sample_uniform(logits[:, 0], sub, sp), cache, key

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
        M = min(_bucket(longest + max_new_tokens), cfg.max_seq_len)
        toks = np.zeros((B, S), np.int32)
        for i, p in enumerate(prompts):
            toks[i, : len(p)] = p
        n_B = jnp.asarray([len(p) for p in prompts], jnp.int32)
        key = jax.random.key(seed)
        cache = self.model.new_cache(B, M)
        key, sub = jax.random.split(key)
        tok, cache = self._prefill(self.params, cache, jnp.asarray(toks), n_B, sub, sampling)
        eos = set(cfg.eos_ids if eos_ids is None else eos_ids)
        done = np.zeros(B, bool)
        for i in range(max_new_tokens):
            nxt = None
            if i + 1 < max_new_tokens:
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

    def sample(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int,
        pad_to: int = 0,
    ) -> tuple[list[list[int]], list[bool]]:
        """(new tokens per prompt without the end token, whether each row ended at one).

        `pad_to`: run the batch padded with copies of the first prompt to this many rows (their
        outputs dropped), so that batches of varying size share one compiled step. Raises
        PromptError / ValueError as `stream` and SamplingParams do."""
        rows = list(prompts)
        n = len(rows)
        if pad_to > n:
            rows += [rows[0]] * (pad_to - n)
        sp = SamplingParams(temperature=temperature, top_p=top_p)
        eos = set(self.model.cfg.eos_ids)
        outs = self.generate(rows, max_new_tokens, sp, seed, include_eos=True)[:n]
        ended = [bool(o) and o[-1] in eos for o in outs]
        return [o[:-1] if e else o for o, e in zip(outs, ended, strict=True)], ended


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
