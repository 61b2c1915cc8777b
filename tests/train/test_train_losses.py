"""Training losses: routing-distillation targets (Eq. 4), KL, and the chunked LM-head loss."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from readme_jax.model import llama
from readme_jax.refactor.stats import token_activations
from readme_jax.train import losses


def test_routing_targets_match_a_hand_computed_example():
    # 1 token, 2 layers, F = 4 channels, 2 experts; the token's top 50% = its 2 largest |h|.
    abs_h = np.array([[[[0.9, 0.1, 0.8, 0.0]]], [[[0.0, 0.7, 0.2, 0.6]]]], np.float32)
    shared = np.array([[1, 0, 0, 0], [0, 0, 0, 0]], np.float32)  # layer 0 shares channel 0
    private = np.array(
        [[[0, 1, 0, 0], [0, 0, 1, 1]],  # layer 0: e0 = {1}, e1 = {2, 3}
         [[0, 1, 1, 0], [1, 0, 0, 1]]],  # layer 1: e0 = {1, 2}, e1 = {0, 3}
        np.float32,
    )  # fmt: skip
    # layer 0 top = {0, 2}: e0 covers {0} -> 1, e1 covers {0, 2} -> 2
    # layer 1 top = {1, 3}: e0 covers {1} -> 1, e1 covers {3} -> 1;  totals 2 : 3
    t = losses.routing_targets(abs_h, losses.union_masks(shared, private), 0.5)
    np.testing.assert_allclose(np.asarray(t)[0, 0], [2 / 5, 3 / 5], rtol=1e-6)
    # without the shared expert's channels: 0 + 1 : 1 + 1 -> 1/3, 2/3
    t2 = losses.routing_targets(abs_h, losses.union_masks(0 * shared, private), 0.5)
    np.testing.assert_allclose(np.asarray(t2)[0, 0], [1 / 3, 2 / 3], rtol=1e-6)


def test_coverage_inside_the_teacher_forward_equals_the_materialised_targets():
    from train_helpers import teacher_cfg

    cfg = teacher_cfg()
    params = llama.init_params(cfg, jax.random.key(1))
    toks = jax.random.randint(jax.random.key(2), (2, 16), 0, cfg.vocab_size)
    rng = np.random.default_rng(0)
    union = jnp.asarray(rng.random((cfg.n_layers, cfg.ffn_dim, 3)) < 0.4, jnp.float32)
    ffn = losses.coverage_ffn(union, 0.5)
    fwd = jax.jit(lambda p, t: llama.forward(p, t, cfg, ffn=ffn, return_hidden=True)[2])
    cov = fwd(params, toks)
    ref = losses.routing_targets(token_activations(params, toks, cfg), union, 0.5)
    np.testing.assert_allclose(losses.normalize_counts(cov.sum(0)), ref, rtol=1e-6)


def test_routing_kl_is_zero_at_the_target_and_positive_elsewhere():
    p = jnp.array([[[0.2, 0.3, 0.5]]])
    mask = jnp.ones((1, 1))
    assert float(losses.routing_kl(p, jnp.log(p), mask)) == pytest.approx(0.0, abs=1e-6)
    assert float(losses.routing_kl(p, jnp.zeros_like(p), mask)) > 0.01


@pytest.mark.parametrize(
    "transposed,kd,temp", [(False, 0.0, 1.0), (False, 1.0, 2.0), (True, 1.0, 1.0)]
)
def test_chunked_head_loss_and_grads_equal_full_logits(transposed, kd, temp):
    k = jax.random.split(jax.random.key(0), 6)
    T, D, V = 37, 8, 50
    h, th = jax.random.normal(k[0], (T, D)), jax.random.normal(k[2], (T, D))
    w, tw = jax.random.normal(k[1], (V, D)), jax.random.normal(k[3], (V, D))
    if transposed:
        w, tw = w.T, tw.T
    y = jax.random.randint(k[4], (T,), 0, V)
    wt = jax.random.uniform(k[5], (T,))
    kw = dict(
        teacher_h_TxD=th,
        teacher_w_head=tw,
        lm_weight=0.7,
        kd_weight=kd,
        temperature=temp,
        transposed=transposed,
    )
    got, g_got = jax.value_and_grad(
        lambda h, w: losses.head_loss(h, w, y, wt, chunk=8, **kw)[0], argnums=(0, 1)
    )(h, w)
    want, g_want = jax.value_and_grad(
        lambda h, w: losses.reference_head_loss(h, w, y, wt, **kw), argnums=(0, 1)
    )(h, w)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    chex.assert_trees_all_close(g_got, g_want, rtol=1e-4, atol=1e-5)
    _, g_nw = jax.grad(
        lambda h, w: losses.head_loss(h, w, y, wt, chunk=8, need_w_grad=False, **kw)[0],
        argnums=(0, 1),
    )(h, w)
    assert not np.any(np.asarray(g_nw))


@pytest.mark.parametrize("scan", [True, False])
def test_remat_forward_equals_forward_in_value_and_gradient(scan):
    """The per-layer recompute path (train.remat, used by the 7B presets, is llama.forward's
    remat flag) must give the same hidden states and gradients."""
    from readme_jax.model.config import LlamaConfig

    cfg = LlamaConfig(vocab_size=64, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=24,
                      head_dim=4, max_seq_len=32, scan_layers=scan)  # fmt: skip
    params = llama.init_params(cfg, jax.random.key(0))
    if not scan:
        params = llama.unstack_layers(params)
    tok = jax.random.randint(jax.random.key(1), (2, 12), 0, 64)
    seg = jnp.concatenate([jnp.ones((2, 7), jnp.int32), 2 * jnp.ones((2, 5), jnp.int32)], 1)
    pos = jnp.concatenate([jnp.arange(7), jnp.arange(5)])[None].repeat(2, 0)

    def plain(p):
        return llama.forward(p, tok, cfg, ffn=llama.dense_ffn, segment_ids_BxS=seg,
                             positions_BxS=pos, return_hidden=True)[0]  # fmt: skip

    def remat(p):
        return llama.forward(p, tok, cfg, ffn=llama.dense_ffn, segment_ids_BxS=seg,
                             positions_BxS=pos, return_hidden=True, remat=True)[0]  # fmt: skip

    # jitted, as training runs them (eager, every op compiles on its own)
    np.testing.assert_allclose(jax.jit(remat)(params), jax.jit(plain)(params), rtol=1e-5, atol=1e-5)
    g_plain = jax.jit(jax.grad(lambda p: jnp.sum(jnp.sin(plain(p)))))(params)
    g_remat = jax.jit(jax.grad(lambda p: jnp.sum(jnp.sin(remat(p)))))(params)
    for a, b in zip(jax.tree.leaves(g_remat), jax.tree.leaves(g_plain), strict=True):
        # f32 summation order differs between the two graphs; scale atol to the gradient
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()))


def test_target_temperature_sharpens_without_changing_the_ranking():
    counts = jnp.array([[30.0, 29.0, 28.0, 27.0], [5.0, 5.0, 5.0, 5.0]])
    plain = losses.normalize_counts(counts)
    np.testing.assert_allclose(plain[0], counts[0] / counts[0].sum(), rtol=1e-6)
    sharp = losses.normalize_counts(counts, temperature=0.05)
    np.testing.assert_allclose(sharp.sum(-1), 1.0, rtol=1e-6)
    assert np.all(np.diff(np.asarray(sharp[0])) < 0)  # same order as the counts
    assert sharp[0, 0] > 2 * plain[0, 0]  # (30/27)^20 ~ 8: far from uniform
    np.testing.assert_allclose(sharp[1], 0.25, rtol=1e-6)  # ties stay uniform
    # p ∝ counts^(1/T)
    want = counts[0] ** 20 / jnp.sum(counts[0] ** 20)
    np.testing.assert_allclose(sharp[0], want, rtol=1e-5)
