"""Causal-block attention (model/llama.py `attend`): a prefill into an empty cache scores each
query block only against the keys up to its end; the logits equal the full-scores path."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import readme_jax as rj
from readme_jax.decode.generator import Generator
from readme_jax.decode.steps import dense_model, readme_model
from readme_jax.model import llama
from readme_jax.testing import tiny_llama_config, tiny_readme

ATOL = 1e-4


def _full_scores(monkeypatch):
    monkeypatch.setattr(llama, "causal_block_ends", lambda S, M, block=None: None)


@pytest.mark.parametrize(
    ("S", "M", "ends"),
    [
        (512, 512, [128, 256, 384, 512]),
        (304, 320, [128, 256, 304]),  # the last block is shorter where S does not divide
        (200, 200, [128, 200]),
        (128, 512, [128]),  # one block: the keys cut to the prompt
        (128, 128, None),  # one block over its own keys: nothing to skip
        (32, 1024, None),  # short: decode steps and small chunks keep the plain path
        (600, 512, None),
    ],
)
def test_block_ends_follow_the_documented_rule(S, M, ends):
    assert llama.causal_block_ends(S, M, 128) == ends


@pytest.mark.parametrize("S", [24, 29])
def test_blocked_attention_equals_full_scores_under_a_causal_mask(S):
    B, H, K, hd, M = 2, 6, 2, 8, 40
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (B, S, H, hd))
    k = jax.random.normal(kk, (B, M, K, hd))
    v = jax.random.normal(kv, (B, M, K, hd))
    mask = jnp.broadcast_to(jnp.arange(M)[None, :] <= jnp.arange(S)[:, None], (B, S, M))
    ends = llama.causal_block_ends(S, M, 8)
    assert ends is not None and len(ends) == -(-S // 8)
    got = llama.blocked_attention(q, k, v, mask, ends)
    np.testing.assert_allclose(got, llama.attention(q, k, v, mask), rtol=0, atol=1e-5)


def _prefill_then_decode(params, cfg, tokens_BxS, n_first):
    """Logits of a prefill of n_first tokens into an empty cache, then of the rest as a second
    chunk (a prefix already cached: the plain path in the same kind of step)."""
    step = jax.jit(functools.partial(llama.forward, cfg=cfg))
    B, S = tokens_BxS.shape
    cache = llama.init_cache(cfg, B, 64, per_layer=not cfg.scan_layers)
    a, cache, _ = step(params, tokens_BxS[:, :n_first], cache=cache)
    b, cache, _ = step(params, tokens_BxS[:, n_first:], cache=cache)
    return np.concatenate([np.asarray(a), np.asarray(b)], axis=1)


@pytest.mark.parametrize("scan_layers", [False, True])  # unrolled, per-layer KV; lax.scan
def test_cached_prefill_equals_full_scores_and_the_no_cache_forward(monkeypatch, scan_layers):
    cfg = tiny_llama_config().replace(scan_layers=scan_layers)
    params = llama.init_params(cfg, jax.random.key(1))
    tokens_BxS = jax.random.randint(jax.random.key(2), (2, 40), 0, cfg.vocab_size)
    monkeypatch.setattr(llama, "CAUSAL_BLOCK", 8)  # 28 tokens: blocks 8, 16, 24, 28
    blocked = _prefill_then_decode(params, cfg, tokens_BxS, 28)
    _full_scores(monkeypatch)
    full = _prefill_then_decode(params, cfg, tokens_BxS, 28)
    ref = np.asarray(llama.forward(params, tokens_BxS, cfg)[0])
    np.testing.assert_allclose(blocked, full, rtol=0, atol=ATOL)
    np.testing.assert_allclose(blocked, ref, rtol=0, atol=ATOL)


def test_readme_generator_tokens_equal_full_scores(monkeypatch):
    """Read-ME's router and backbone both prefill through `attend`: same logits, same tokens."""
    m = tiny_readme()
    prompt = list(np.random.default_rng(3).integers(3, 97, 30))

    def run():
        gen = Generator(readme_model(m.rc), m.params)
        toks = jnp.asarray([prompt + [0, 0]], jnp.int32)  # the Generator's bucket: 32
        # jitted: one program (eager, every op of the unrolled layers compiles on its own)
        logits, _ = jax.jit(gen.model.step)(gen.params, toks, gen.model.new_cache(1, 48), None)
        return np.asarray(logits[0, :30]), gen.generate([prompt], 8, eos_ids=[])[0]

    monkeypatch.setattr(llama, "CAUSAL_BLOCK", 8)  # blocks 8, 16, 24, 32
    blocked_logits, blocked_tokens = run()
    _full_scores(monkeypatch)
    full_logits, full_tokens = run()
    np.testing.assert_allclose(blocked_logits, full_logits, rtol=0, atol=ATOL)
    assert blocked_tokens == full_tokens


def test_prefill_compiles_block_shaped_scores_behind_a_device_cond(monkeypatch):
    """The compiled prefill holds the blocked branch: its score tensors are the blocks', not
    one [S, M] square."""
    cfg = tiny_llama_config().replace(scan_layers=False)
    params = llama.init_params(cfg, jax.random.key(1))
    cache = llama.init_cache(cfg, 1, 32, per_layer=True)
    monkeypatch.setattr(llama, "CAUSAL_BLOCK", 8)
    f = functools.partial(llama.forward, cfg=cfg)
    hlo = jax.jit(f).lower(params, jnp.zeros((1, 32), jnp.int32), cache=cache).as_text()
    assert "stablehlo.case" in hlo or "stablehlo.if" in hlo  # picked on device
    assert "tensor<1x2x2x8x8xf32>" in hlo  # first block's scores: [B, K, G, 8 queries, 8 keys]
    assert "tensor<1x2x2x8x32xf32>" in hlo  # last block's: 8 queries x all 32 keys


@pytest.mark.slow
def test_smollm2_prefill_and_greedy_tokens_equal_full_scores(monkeypatch):
    """The real model on a 300-token prompt (query blocks of 128, 128 and 44; 48 in the
    Generator's bucket of 304): last-position logits within float tolerance of the full-scores
    path, and the same greedy tokens. The layers run in a lax.scan (one layer body to compile,
    not 30 unrolled ones: 29 -> 21 s of CPU for the test file's run of this test); the tiny
    model above checks the blocked prefill both unrolled and scanned."""
    model = rj.load()
    text = "It is a truth universally acknowledged, that a single man in possession of a good"
    ids = (model.tokenizer.encode(text) * 40)[:300]

    def run():
        gen = Generator(dense_model(model.cfg.replace(scan_layers=True)), model.params)
        logits, _ = jax.jit(gen.model.step)(
            gen.params,
            jnp.asarray([ids], jnp.int32),
            gen.model.new_cache(1, 320),
            None,
            jnp.asarray([len(ids) - 1]),
        )
        return np.asarray(logits[0, 0]), gen.generate([ids], 6, eos_ids=[])[0]

    assert llama.causal_block_ends(304, 320) == [128, 256, 304]  # the Generator's bucket
    blocked_logits, blocked_tokens = run()
    _full_scores(monkeypatch)
    full_logits, full_tokens = run()
    np.testing.assert_allclose(blocked_logits, full_logits, rtol=0, atol=1e-3)
    assert blocked_tokens == full_tokens
