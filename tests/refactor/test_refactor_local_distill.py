"""Layer-local distillation on a tiny model."""

import jax
import numpy as np
import pytest

from readme_jax.model import llama
from readme_jax.model.config import LlamaConfig
from readme_jax.refactor import experts
from readme_jax.refactor import local_distill as ld
from readme_jax.refactor.local_distill import local_ffn_mse

CFG = LlamaConfig(vocab_size=64, dim=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=24)


def _setup(rate):
    p = llama.init_params(CFG, jax.random.key(0))
    scores = np.random.default_rng(0).random((2, CFG.n_layers, CFG.ffn_dim))
    spec = experts.build_expert_spec(scores, rate, ["a", "b"])
    moe = experts.build_moe_params(llama.stack_layers(p), spec)
    rows = [[np.array(jax.random.randint(jax.random.key(s), (2, 8), 0, 64))] for s in (1, 2)]
    u, y = ld.cache_teacher_io(p, CFG, rows, 16)
    return moe, u, y


def test_loss_is_zero_for_the_dense_ffn_itself():
    moe, u, y = _setup(1.0)  # every channel in the shared expert: the dense FFN
    train = {k: moe["layers"][k] for k in ld.READ_ME_KEYS}
    assert float(ld.local_loss(train, u, y)) < 1e-10
    assert float(local_ffn_mse(y.reshape(2, -1, 16), y.reshape(2, -1, 16))) == 0.0


def test_pruned_experts_start_above_zero_and_training_lowers_it():
    moe, u, y = _setup(0.5)
    train = {k: moe["layers"][k] for k in ld.READ_ME_KEYS}
    before = float(ld.local_loss(train, u, y))
    assert before > 1e-3
    lc = ld.LocalDistillConfig(steps=30, tokens=16, batch=16, lr=3e-3)
    new, hist = ld.run_local_distill(moe, u, y, lc)
    after = float(ld.local_loss({k: new["layers"][k] for k in ld.READ_ME_KEYS}, u, y))
    assert after < 0.7 * before and len(hist) == 30
    # zero padding stays zero (no gradient reaches a padded channel)
    pad = np.asarray(moe["layers"]["expert_down"]) == 0
    assert np.all(np.asarray(new["layers"]["expert_down"])[pad.all(-1)] == 0)


def test_clustered_experts_are_refused_with_a_clear_error():
    lc = ld.LocalDistillConfig(steps=1)
    with pytest.raises(ValueError, match="local_steps=0"):
        ld.at_refactor(lc, {}, None, {}, ["cluster0", "cluster1"], {"fiction": [], "drama": []})
