"""The Flax NNX modules (Router, MoEFFN, ReadME) give exactly their pure functions' outputs,
survive nnx.split / nnx.merge under jax.jit, and compose inside a user's own Flax model."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from readme_jax.model import llama, moe
from readme_jax.model.config import LlamaConfig, MoEConfig, ReadMEConfig, RouterConfig
from readme_jax.model.readme import ReadME, init_readme_params, readme_forward
from readme_jax.model.router import Router, init_router, router_logits, top_k_routing
from readme_jax.refactor import experts as ex

CFG = LlamaConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48)
RCFG = RouterConfig(dim=16, n_heads=2, ffn_dim=32)
E, B, S = 4, 2, 7


def _tokens(seed=3):
    return jax.random.randint(jax.random.key(seed), (B, S), 0, CFG.vocab_size)


def _jit_roundtrip(module, *args):
    """Output of `module(*args)` after nnx.split, a jitted nnx.merge, and the call."""
    graphdef, state = nnx.split(module)
    call = jax.jit(lambda st, *a: nnx.merge(graphdef, st)(*a))
    return call(state, *args)


@pytest.mark.parametrize("k,gate", [(1, False), (2, True)])
def test_router_module_equals_router_logits_and_top_k(k, gate):
    mcfg = MoEConfig(E, top_k=k, gate_scaling=gate)
    params = init_router(RCFG, CFG, E, jax.random.key(4))
    router = Router(RCFG, CFG, mcfg, params)
    toks = _tokens()
    logits, routing = router(toks)
    chex.assert_shape(logits, (B, S, E))
    chex.assert_shape(routing, (B, S, k))
    want_logits, _ = router_logits(params, toks, RCFG, CFG)
    chex.assert_trees_all_close(
        (logits, routing), (want_logits, top_k_routing(want_logits, k, gate)), rtol=0, atol=0
    )
    chex.assert_trees_all_close(
        _jit_roundtrip(router, toks), (logits, routing), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("layerwise", [False, True])
def test_moe_ffn_module_equals_moe_ffn(layerwise):
    mcfg = MoEConfig(E, top_k=2, layerwise=layerwise)
    ffn = moe.MoEFFN(mcfg, dim=CFG.dim, shared_width=8, expert_width=12, rngs=nnx.Rngs(5))
    chex.assert_shape(ffn.params["expert_gate_up"], (E, CFG.dim, 2, 12))
    x = jax.random.normal(jax.random.key(6), (B, S, CFG.dim))
    logits = jax.random.normal(jax.random.key(7), (B, S, E))
    routing = None if layerwise else top_k_routing(logits, 2, False)
    y, aux = ffn(x, routing, return_aux=True)
    want_y, want_aux = moe.moe_ffn(mcfg, routing)(ffn.params, x, None)
    chex.assert_shape(y, (B, S, CFG.dim))
    chex.assert_trees_all_close((y, aux), (want_y, want_aux), rtol=0, atol=0)
    assert (aux is not None) == layerwise
    chex.assert_trees_all_close(_jit_roundtrip(ffn, x, routing), y, rtol=1e-5, atol=1e-6)


def test_moe_ffn_module_rejects_bad_inputs():
    ffn = moe.MoEFFN(MoEConfig(E), dim=CFG.dim, shared_width=8, expert_width=12)
    x = jnp.zeros((B, S, CFG.dim))
    with pytest.raises(ValueError, match="needs routing"):
        ffn(x)
    with pytest.raises(AssertionError):  # the model width does not match
        ffn(jnp.zeros((B, S, CFG.dim + 1)), top_k_routing(jnp.zeros((B, S, E)), 1, False))
    with pytest.raises(ValueError, match="needs params"):
        moe.MoEFFN(MoEConfig(E), dim=CFG.dim)


def test_readme_module_equals_readme_forward_on_refactored_experts():
    dense = llama.init_params(CFG, jax.random.key(0))
    scores = np.random.default_rng(0).random((E, CFG.n_layers, CFG.ffn_dim))
    spec = ex.build_expert_spec(scores, 0.5, [f"d{i}" for i in range(E)])
    rc = ReadMEConfig(CFG, MoEConfig(E), RCFG)
    params = {
        "backbone": ex.build_moe_params(dense, spec),
        "router": init_router(RCFG, CFG, E, jax.random.key(4), dense["embed"]),
    }
    model = ReadME(rc, params)
    toks = _tokens()
    logits = model(toks)
    chex.assert_shape(logits, (B, S, CFG.vocab_size))
    chex.assert_trees_all_close(logits, readme_forward(params, toks, rc)[0], rtol=0, atol=0)
    chex.assert_trees_all_close(model.params, params, rtol=0, atol=0)
    chex.assert_trees_all_close(_jit_roundtrip(model, toks), logits, rtol=1e-5, atol=1e-6)


def test_random_readme_module_and_layerwise_baseline():
    rc = ReadMEConfig(CFG, MoEConfig(E, layerwise=True), RCFG)
    model = ReadME(rc, shared_width=8, expert_width=12, rngs=nnx.Rngs(1))
    assert model.router is None and "router" not in model.params
    toks = _tokens()
    want = readme_forward(init_readme_params(rc, 8, 12, nnx.Rngs(1).params()), toks, rc)[0]
    chex.assert_trees_all_close(model(toks), want, rtol=0, atol=0)


class _UserBlock(nnx.Module):
    """A user's own Flax model: an embedding, then the Read-ME router and one MoE FFN layer."""

    def __init__(self, rngs: nnx.Rngs):
        mcfg = MoEConfig(E, top_k=1)
        self.embed = nnx.Embed(CFG.vocab_size, CFG.dim, rngs=rngs)
        self.router = Router(RCFG, CFG, mcfg, rngs=rngs)
        self.ffn = moe.MoEFFN(mcfg, dim=CFG.dim, shared_width=8, expert_width=12, rngs=rngs)

    def __call__(self, tokens_BxS):
        _, routing = self.router(tokens_BxS)
        return self.ffn(self.embed(tokens_BxS), routing)


def test_router_and_moe_layer_compose_in_a_user_model_under_jit_and_grad():
    block = _UserBlock(nnx.Rngs(0))
    toks = _tokens()
    y = block(toks)
    routing = top_k_routing(router_logits(block.router.params, toks, RCFG, CFG)[0], 1, False)
    want = moe.moe_ffn(MoEConfig(E), routing)(block.ffn.params, block.embed(toks), None)[0]
    chex.assert_trees_all_close(y, want, rtol=0, atol=0)
    chex.assert_trees_all_close(_jit_roundtrip(block, toks), y, rtol=1e-5, atol=1e-6)
    # nnx.grad reaches the experts' nnx.Param leaves through the module tree
    grads = nnx.grad(lambda m: jnp.sum(m(toks) ** 2))(block)
    g = grads["ffn"]["weights"]["expert_gate_up"][...]
    chex.assert_shape(g, (E, CFG.dim, 2, 12))
    assert float(jnp.abs(g).sum()) > 0
