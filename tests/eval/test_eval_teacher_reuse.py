"""One teacher pass per evaluation batch, reused for every model's KL."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from readme_jax.eval.domains import evaluate_domains, evaluate_domains_many
from readme_jax.eval.perplexity import (
    dense_logits_fn,
    n_batches,
    perplexity_and_fidelity,
    perplexity_and_fidelity_many,
)
from readme_jax.model import llama
from readme_jax.model.config import LlamaConfig

CFG = LlamaConfig(vocab_size=96, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
                  max_seq_len=64)  # fmt: skip


def _counting(fn, counter: list[int]):
    """fn with a host callback that counts executions (not traces) of the compiled forward."""

    def bump():
        counter[0] += 1

    def wrapped(params, tokens_BxS):
        jax.debug.callback(bump)
        return fn(params, tokens_BxS)

    return wrapped


@pytest.fixture(scope="module")
def models():
    return [llama.init_params(CFG, jax.random.key(i)) for i in range(4)]


def test_teacher_runs_once_per_batch_whatever_the_number_of_models(models):
    toks = np.random.default_rng(0).integers(0, CFG.vocab_size, 150).astype(np.int32)
    calls = [0]
    teacher = _counting(dense_logits_fn(CFG), calls)
    students = {f"m{i}": (dense_logits_fn(CFG), p) for i, p in enumerate(models[1:])}
    win = dict(max_length=32, batch_size=2, progress=False)
    _, res = perplexity_and_fidelity_many(teacher, models[0], students, toks, **win)
    jax.effects_barrier()
    assert calls[0] == n_batches(len(toks), 32, None, 2)  # not 3x that
    for k in students:
        r, f = perplexity_and_fidelity(dense_logits_fn(CFG), models[0], *students[k], toks, **win)
        np.testing.assert_allclose(res[k][0].nll_sum, r.nll_sum, rtol=1e-5)
        np.testing.assert_allclose(res[k][1].kl_sum, f.kl_sum, rtol=1e-4, atol=1e-5)
        assert res[k][1].n_agree == f.n_agree and res[k][0].n_tokens == r.n_tokens


def test_teacher_is_its_own_perfect_student(models):
    toks = np.random.default_rng(1).integers(0, CFG.vocab_size, 70).astype(np.int32)
    fn = dense_logits_fn(CFG)
    t, res = perplexity_and_fidelity_many(
        fn, models[0], {"self": (fn, models[0])}, toks, max_length=32, progress=False
    )
    r, f = res["self"]
    assert abs(f.kl) < 1e-5 and f.top1_agreement == 1.0
    np.testing.assert_allclose(t.nll_sum, r.nll_sum, rtol=1e-6)


def test_domains_many_matches_one_at_a_time(models):
    rng = np.random.default_rng(2)
    streams = {d: (rng.integers(0, CFG.vocab_size, 90).astype(np.int32), 300) for d in "ab"}
    fn = dense_logits_fn(CFG)
    win = dict(max_length=32, batch_size=2, progress=False)
    t_row, rows = evaluate_domains_many((fn, models[0]), {"s": (fn, models[1])}, streams, **win)
    one = evaluate_domains(fn, models[1], streams, teacher=(fn, models[0]), **win)
    ref = evaluate_domains(fn, models[0], streams, **win)
    for d in "ab":
        assert rows["s"]["perplexity"][d]["ppl"] == pytest.approx(one["perplexity"][d]["ppl"])
        assert rows["s"]["fidelity"][d]["kl"] == pytest.approx(one["fidelity"][d]["kl"], 1e-4)
        assert t_row["perplexity"][d]["ppl"] == pytest.approx(ref["perplexity"][d]["ppl"])
        assert t_row["perplexity"][d]["bpb"] == pytest.approx(ref["perplexity"][d]["bpb"])
