"""Router: causal; cached decode equals recompute. Layer-wise baseline routes per layer."""

import jax
import jax.numpy as jnp
import numpy as np

from readme_jax.model import llama, moe
from readme_jax.model.config import LlamaConfig, RouterConfig
from readme_jax.model.router import (
    init_layerwise_gates,
    init_router,
    init_router_cache,
    router_logits,
    top_k_routing,
)
from readme_jax.refactor import experts as ex

CFG = LlamaConfig(vocab_size=101, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48)
RCFG = RouterConfig(dim=16, n_heads=2, ffn_dim=32)
E = 3
# jitted: one program per input shape (eager, every op of the router compiles on its own)
logits_jit = jax.jit(router_logits, static_argnums=(2, 3))


def _router(seed=0):
    emb = jax.random.normal(jax.random.key(9), (CFG.vocab_size, CFG.dim))
    return init_router(RCFG, CFG, E, jax.random.key(seed), backbone_embed_VxD=emb)


def test_router_is_causal():
    rp = _router()
    toks = jax.random.randint(jax.random.key(1), (2, 12), 0, CFG.vocab_size)
    a, _ = logits_jit(rp, toks, RCFG, CFG)
    changed = toks.at[:, 8:].set((toks[:, 8:] + 7) % CFG.vocab_size)
    b, _ = logits_jit(rp, changed, RCFG, CFG)
    np.testing.assert_allclose(a[:, :8], b[:, :8], atol=1e-6)
    assert np.abs(np.asarray(a[:, 8:] - b[:, 8:])).max() > 1e-4  # later routes did change


def test_router_decode_with_cache_equals_full_recompute():
    rp = _router()
    toks = jax.random.randint(jax.random.key(2), (2, 10), 0, CFG.vocab_size)
    full, _ = logits_jit(rp, toks, RCFG, CFG)
    cache = init_router_cache(RCFG, CFG, 2, 16)
    first, cache = logits_jit(rp, toks[:, :4], RCFG, CFG, cache=cache)
    steps = [first]
    for t in range(4, 10):
        lg, cache = logits_jit(rp, toks[:, t : t + 1], RCFG, CFG, cache=cache)
        steps.append(lg)
    np.testing.assert_allclose(jnp.concatenate(steps, 1), full, atol=1e-5)
    assert np.all(np.asarray(cache["lengths"]) == 10)


def test_router_embedding_starts_from_backbone_projection():
    emb = jax.random.normal(jax.random.key(9), (CFG.vocab_size, CFG.dim))
    rp = init_router(RCFG, CFG, E, jax.random.key(0), backbone_embed_VxD=emb)
    # a fixed linear projection preserves the backbone's similarity structure (up to noise)
    sim_b = np.corrcoef(np.asarray(emb))
    sim_r = np.corrcoef(np.asarray(rp["embed"]))
    assert np.corrcoef(sim_b.ravel(), sim_r.ravel())[0, 1] > 0.5
    assert rp["head"].shape == (RCFG.dim, E)


def test_top_k_routing_weights():
    logits = jnp.array([[[0.0, 2.0, 1.0]]])
    e, w = top_k_routing(logits, 2, gate_scaling=False)
    assert e.tolist() == [[[1, 2]]] and w.tolist() == [[[1.0, 1.0]]]
    e, w = top_k_routing(logits, 2, gate_scaling=True)
    np.testing.assert_allclose(w[0, 0], jax.nn.softmax(jnp.array([2.0, 1.0])), rtol=1e-6)


def test_layerwise_baseline_routes_each_layer_from_hidden_state():
    dense = llama.init_params(CFG, jax.random.key(0))
    rng = np.random.default_rng(0)
    spec = ex.build_expert_spec(rng.random((E, CFG.n_layers, CFG.ffn_dim)), 0.5, ["a", "b", "c"])
    gates = init_layerwise_gates(CFG, E, jax.random.key(4)) * 50
    mp = ex.build_moe_params(dense, spec, gates_LxDxE=gates)
    toks = jax.random.randint(jax.random.key(3), (2, 9), 0, CFG.vocab_size)
    fwd = jax.jit(moe.moe_forward, static_argnums=(2, 3))
    logits, _, aux_LxBxSxE = fwd(mp, toks, CFG, moe.MoEConfig(E, layerwise=True), None)
    assert aux_LxBxSxE.shape == (CFG.n_layers, 2, 9, E)
    choices = np.asarray(jnp.argmax(aux_LxBxSxE, -1))
    assert (choices[0] != choices[1]).any()  # layers disagree: routing really is per layer
    # equals the masked reference with each layer's own routing
    sh, em = ex.expert_channel_masks(spec, CFG.ffn_dim)

    def ref_ffn(lp, x, layer):
        e = jnp.asarray(choices)[layer][..., None]
        return ex.dense_masked_ffn(sh, em, (e, jnp.ones(e.shape)))(lp, x, layer)

    want = jax.jit(lambda p, t: llama.forward(p, t, CFG, ffn=ref_ffn)[0])(dense, toks)
    np.testing.assert_allclose(logits, want, atol=1e-5)
