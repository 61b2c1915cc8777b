"""Sliding-window perplexity, bits per byte and distillation fidelity on a tiny random Llama."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from readme_jax.eval.domains import domain_stream, evaluate_domains
from readme_jax.eval.perplexity import (
    PerplexityResult,
    dense_logits_fn,
    fidelity,
    perplexity,
    perplexity_and_fidelity,
    sliding_windows,
)
from readme_jax.model import llama
from readme_jax.model.config import LlamaConfig

CFG = LlamaConfig(vocab_size=128, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                  max_seq_len=64)  # fmt: skip


@pytest.fixture(scope="module")
def params():
    return jax.jit(llama.init_params, static_argnums=0)(CFG, jax.random.key(0))


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, CFG.vocab_size, size=61).astype(np.int32)


_forward = jax.jit(llama.forward, static_argnames=("cfg",))


def _np_logits(params, ids) -> np.ndarray:
    """The model's logits for one sequence (the reference scores them in NumPy). Right-padded
    to one length so jit compiles once; causal attention keeps padding out of real positions."""
    padded = np.zeros((1, CFG.max_seq_len), np.int32)
    padded[0, : len(ids)] = ids
    logits, _, _ = _forward(params, padded, CFG)
    return np.asarray(logits[0, : len(ids)], np.float64)


def _np_log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _hf_doc_loop(params, tokens, max_length, stride):
    """The transformers doc's loop, literally, with labels=-100 masking and the internal shift;
    summing per-token NLLs instead of mean * (valid - batch)."""
    nll_sum, n, prev_end = 0.0, 0, 0
    for begin in range(0, len(tokens), stride):
        end = min(begin + max_length, len(tokens))
        trg_len = end - prev_end
        input_ids = tokens[begin:end]
        target_ids = input_ids.astype(np.int64).copy()
        target_ids[:-trg_len] = -100
        logp = _np_log_softmax(_np_logits(params, input_ids))
        for j in range(len(input_ids) - 1):  # logits at j predict label j + 1
            if target_ids[j + 1] != -100:
                nll_sum -= logp[j, target_ids[j + 1]]
                n += 1
        prev_end = end
        if end == len(tokens):
            break
    return nll_sum, n


def test_perplexity_equals_exp_mean_nll_by_hand(params, tokens):
    ids = tokens[:40]
    logp = _np_log_softmax(_np_logits(params, ids))
    nll = [-logp[t - 1, ids[t]] for t in range(1, len(ids))]
    r = perplexity(dense_logits_fn(CFG), params, ids, max_length=64, progress=False)
    assert r.n_tokens == len(ids) - 1
    np.testing.assert_allclose(r.nll_sum, np.sum(nll), rtol=1e-5)
    np.testing.assert_allclose(r.ppl, math.exp(np.mean(nll)), rtol=1e-5)


@pytest.mark.parametrize("max_length,stride", [(16, 16), (16, 8), (16, 5), (20, 1)])
def test_sliding_window_matches_hf_doc_loop(params, tokens, max_length, stride):
    want_sum, want_n = _hf_doc_loop(params, tokens, max_length, stride)
    # batch_size 3 pads the final batch and the final short window
    r = perplexity(dense_logits_fn(CFG), params, tokens, max_length=max_length, stride=stride,
                   batch_size=3, progress=False)  # fmt: skip
    assert r.n_tokens == want_n
    np.testing.assert_allclose(r.nll_sum, want_sum, rtol=1e-5)


def test_stride_equal_to_max_length_gives_disjoint_windows(params, tokens):
    ws = sliding_windows(len(tokens), 16, 16)
    assert [(w.begin, w.end) for w in ws] == [(0, 16), (16, 32), (32, 48), (48, 61)]
    assert [w.score_from for w in ws] == [1, 17, 33, 49]  # a window's first token has no context
    whole = perplexity(dense_logits_fn(CFG), params, tokens, max_length=16, progress=False)
    parts = [perplexity(dense_logits_fn(CFG), params, tokens[w.begin : w.end], max_length=16,
                        progress=False) for w in ws]  # fmt: skip
    assert whole.n_tokens == len(tokens) - len(ws) == sum(p.n_tokens for p in parts)
    np.testing.assert_allclose(whole.nll_sum, sum(p.nll_sum for p in parts), rtol=1e-5)


def test_overlapping_stride_scores_every_token_once_with_longer_context():
    T, M, stride = 61, 16, 4
    ws = sliding_windows(T, M, stride)
    scored = np.concatenate([np.arange(w.score_from, w.end) for w in ws])
    np.testing.assert_array_equal(scored, np.arange(1, T))  # each of 1..T-1 once, in order
    context = np.concatenate([np.arange(w.score_from, w.end) - w.begin for w in ws])
    assert context[M - 1 :].min() >= M - stride  # after the first window
    disjoint = sliding_windows(T, M, M)
    disjoint_ctx = np.concatenate([np.arange(w.score_from, w.end) - w.begin for w in disjoint])
    assert context.mean() > disjoint_ctx.mean()


def test_bits_per_byte_relation():
    r = PerplexityResult(nll_sum=1234.5, n_tokens=1000, n_bytes=4321)
    assert r.bpb == pytest.approx(1234.5 / math.log(2) / 4321)
    byte_level = PerplexityResult(nll_sum=1234.5, n_tokens=1000, n_bytes=1000)
    assert byte_level.bpb == pytest.approx(math.log2(byte_level.ppl))
    assert PerplexityResult(1.0, 2).bpb is None
    assert r.to_dict()["bpb"] == r.bpb


def test_bad_windows_and_token_ids_are_rejected(params, tokens):
    with pytest.raises(ValueError, match="stride"):
        sliding_windows(100, 16, 17)
    with pytest.raises(ValueError, match="vocabulary"):
        perplexity(dense_logits_fn(CFG), params, np.array([1, 2, 500]), max_length=16,
                   vocab_size=CFG.vocab_size, progress=False)  # fmt: skip


def test_fidelity_of_identical_models_is_perfect(params, tokens):
    f = dense_logits_fn(CFG)
    r = fidelity(f, params, f, params, tokens, max_length=16, stride=8, batch_size=2,
                 progress=False)  # fmt: skip
    assert r.n_tokens == len(tokens) - 1
    assert abs(r.kl) < 1e-6
    assert r.top1_agreement == 1.0


def test_fidelity_matches_numpy_kl_for_different_models(params, tokens):
    other = jax.jit(llama.init_params, static_argnums=0)(CFG, jax.random.key(1))
    other = jax.tree.map(lambda a: a * 3.0, other)  # sharper logits, so the models disagree
    f = dense_logits_fn(CFG)
    ids = tokens[:30]
    r = fidelity(f, params, f, other, ids, max_length=32, progress=False)
    t, s = _np_log_softmax(_np_logits(params, ids)), _np_log_softmax(_np_logits(other, ids))
    kl = (np.exp(t) * (t - s)).sum(-1)[:-1]
    agree = (t.argmax(-1) == s.argmax(-1))[:-1]
    assert r.n_tokens == len(ids) - 1
    np.testing.assert_allclose(r.kl, kl.mean(), rtol=1e-4)
    assert r.n_agree == agree.sum()
    assert r.kl > 1e-3


def test_one_pass_equals_separate_perplexity_and_fidelity(params, tokens):
    other = jax.jit(llama.init_params, static_argnums=0)(CFG, jax.random.key(1))
    other = jax.tree.map(lambda a: a * 3.0, other)
    f = dense_logits_fn(CFG)
    win = dict(max_length=16, stride=8, progress=False)
    p, fid = perplexity_and_fidelity(f, params, f, other, tokens, n_bytes=99, **win)
    want_p = perplexity(f, other, tokens, n_bytes=99, **win)
    want_f = fidelity(f, params, f, other, tokens, **win)
    assert p.n_tokens == want_p.n_tokens == fid.n_tokens == want_f.n_tokens
    np.testing.assert_allclose(p.nll_sum, want_p.nll_sum, rtol=1e-5)
    np.testing.assert_allclose(fid.kl_sum, want_f.kl_sum, rtol=1e-5)
    assert fid.n_agree == want_f.n_agree and p.bpb == pytest.approx(want_p.bpb)


def test_evaluate_domains_fills_the_report_layout(params, tokens):
    streams = {"a": (tokens[:30], 120), "b": (tokens[30:], None)}
    f = dense_logits_fn(CFG)
    out = evaluate_domains(f, params, streams, max_length=16, stride=8, teacher=(f, params),
                           progress=False)  # fmt: skip
    assert set(out) == {"perplexity", "fidelity"} and set(out["perplexity"]) == {"a", "b"}
    direct = perplexity(f, params, tokens[:30], max_length=16, stride=8, progress=False)
    assert out["perplexity"]["a"]["ppl"] == pytest.approx(direct.ppl)
    assert out["perplexity"]["a"]["bpb"] == pytest.approx(direct.nll_sum / math.log(2) / 120)
    assert out["perplexity"]["b"]["bpb"] is None
    assert out["fidelity"]["b"]["top1_agreement"] == 1.0


def test_domain_stream_counts_bytes_of_a_cut_stream(monkeypatch):
    from readme_jax.data import pipeline

    class ByteTok:
        def decode(self, ids, skip_special=False):
            return "".join("é" if i == 1 else "a" for i in ids)  # "é" is 2 UTF-8 bytes

    stream = np.array([1, 2, 1, 2, 2, 2], np.uint32)
    monkeypatch.setattr(pipeline, "load_tokens", lambda *a, **k: stream)
    monkeypatch.setattr(pipeline, "token_stats", lambda *a, **k: {"bytes": 999})
    toks, n_bytes = domain_stream("x", "test", ByteTok())
    assert n_bytes == 999 and len(toks) == 6
    toks, n_bytes = domain_stream("x", "test", ByteTok(), max_tokens=3)
    assert toks.tolist() == [1, 2, 1] and n_bytes == 5


def test_per_window_nlls_match_each_window_scored_alone(params, tokens):
    """Every path keeps one mean NLL per window, in window order: each equals the perplexity of
    that window's scored tokens computed by hand, and the windows add up to the totals (batch 3
    pads the last batch: padding rows are no windows)."""
    from readme_jax.eval.perplexity import perplexity_and_fidelity_many

    f = dense_logits_fn(CFG)
    other = jax.tree.map(lambda a: a * 2.0, params)
    win = dict(max_length=16, stride=16, batch_size=3, progress=False)
    ws = sliding_windows(len(tokens), 16, 16)
    want = []
    for w in ws:
        ids = tokens[w.begin : w.end]
        logp = _np_log_softmax(_np_logits(other, ids))
        want.append(
            np.mean([-logp[j - 1, ids[j]] for j in range(w.score_from - w.begin, len(ids))])
        )
    alone = perplexity(f, other, tokens, **win)
    one_pass, _ = perplexity_and_fidelity(f, params, f, other, tokens, **win)
    t, many = perplexity_and_fidelity_many(f, params, {"x": (f, other)}, tokens, **win)
    for r in (alone, one_pass, many["x"][0]):
        assert len(r.window_nll) == len(ws) == 4 and r.window_tokens == (15, 15, 15, 12)
        np.testing.assert_allclose(r.window_nll, want, rtol=1e-5)
        np.testing.assert_allclose(np.dot(r.window_nll, r.window_tokens), r.nll_sum, rtol=1e-6)
        d = r.to_dict()
        assert d["window_nll"] == list(r.window_nll) and d["window_tokens"] == [15, 15, 15, 12]
    assert len(t.window_nll) == 4 and not np.allclose(t.window_nll, want)  # the teacher's own
    assert "window_nll" not in PerplexityResult(1.0, 2).to_dict()  # old layout when not kept
