"""Low-bit weights (model/quant.py): quantization error within the scale's bound, the int8 dot
equal to the dequantized weight's product, low-bit dense and Read-ME models generating through
the same API, the form saved with a model, the fused-projection step equal to an unfused one,
and the serving engine's int8 weights: resident, and offloaded experts moved in int8.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import readme_jax as rj
from readme_jax.checkpoints import models
from readme_jax.decode.generator import Generator
from readme_jax.decode.steps import DecodeModel, dense_model, readme_model
from readme_jax.model import llama, quant
from readme_jax.model.config import ConfigError
from readme_jax.testing import np_init, tiny_llama_config, tiny_readme

PROMPTS = [[5, 17, 33, 4, 60], [9, 8, 7]]


@pytest.fixture(scope="module")
def dense():
    cfg = tiny_llama_config().replace(scan_layers=False)
    return cfg, np_init(llama.param_shapes(cfg), np.random.default_rng(0))


@pytest.fixture(scope="module")
def readme_int8():
    """The tiny Read-ME model (the one `tiny_serve_model(4, 0)` serves), its int8 Generator and
    that Generator's greedy tokens of PROMPTS: the reference of the Read-ME tests below (one
    Generator compiled for all of them)."""
    m = tiny_readme(num_experts=4, seed=0)
    gen = Generator(readme_model(m.rc, "int8"), m.params)
    return m, gen, gen.generate(PROMPTS, 5, eos_ids=[])


@pytest.mark.parametrize("shape,n_block,n_contract", [((6, 5, 7), 3, 1), ((4, 6, 5), 2, 1)])
def test_int8_round_trip_error_is_within_half_a_step_per_channel(shape, n_block, n_contract):
    w = jax.random.normal(jax.random.key(0), shape) * jnp.arange(1, shape[-1] + 1)
    q = quant.quantize_weight(w, n_block, n_contract, "int8")
    assert q.q.qvalue.dtype == jnp.int8
    err = jnp.abs(quant.dequantize(q) - w)
    # Qwix's symmetric absmax: step = max |w| of the channel / 127.5, so rounding (and the clip
    # of the channel's largest entry to 127) errs by at most step / 2 (+ f32 rounding)
    assert bool(jnp.all(err <= q.q.scale * (0.5 + 1e-4)))
    assert float(err.max()) > 0  # it did quantize


def test_int8_dot_equals_the_dequantized_weights_product_to_f32_accuracy():
    k1, k2 = jax.random.split(jax.random.key(1))
    w = jax.random.normal(k1, (64, 40)) * 0.02
    x = jax.random.normal(k2, (3, 64)).at[:, 5].mul(50.0)  # an outlier channel
    ref = x @ quant.dequantize(quant.quantize_weight(w, 2, 1, "int8"))
    y = quant.dot(x, quant.quantize_weight(w, 2, 1, "int8"))
    # the input is kept to step max|x| / 32512: error <= sum_i |w_i| * step / 2 per output
    bound = jnp.sum(jnp.abs(w), 0) * jnp.max(jnp.abs(x), 1, keepdims=True) / 32512 / 2
    assert bool(jnp.all(jnp.abs(y - ref) <= bound * 1.01 + 1e-6))
    y8 = quant.dot(x, quant.quantize_weight(w, 2, 1, "int8_act"))  # 8-bit inputs: coarser
    assert float(jnp.abs(y8 - ref).max()) > 10 * float(jnp.abs(y - ref).max())


def test_quantized_tree_holds_a_quarter_of_the_bytes(dense):
    cfg, params = dense
    layout = llama.unstack_layers(params)
    f32 = quant.weight_bytes(layout)
    # int8 values + f32 scales per output channel + the f32 norms: the tiny model has D=32
    assert quant.weight_bytes(quant.quantize_params(layout, "int8")) < 0.3 * f32
    assert quant.weight_bytes(quant.quantize_params(layout, "bf16")) < 0.51 * f32
    with pytest.raises(ConfigError, match="int8"):
        quant.quantize_params(layout, "int3")


@functools.partial(jax.jit, static_argnums=2)  # one program per weight form (eager: per op)
def _logits(params, tokens_BxS, cfg):
    return llama.forward(params, tokens_BxS, cfg)[0]


@pytest.fixture(scope="module")
def dense_generated(dense):
    """mode -> (its Generator's params, its greedy tokens of PROMPTS), each mode's Generator
    compiled and run once for the module (the int8 case compares with int8_qwix's tokens)."""
    cfg, params = dense
    done = {}

    def get(mode):
        if mode not in done:
            gen = Generator(dense_model(cfg, mode), params)
            done[mode] = gen.params, gen.generate(PROMPTS, 6, eos_ids=[])
        return done[mode]

    return get


@pytest.mark.parametrize("mode", ["int8", "int8_qwix", "bf16", "int8_act"])
def test_low_bit_dense_model_generates_like_its_reference(dense, dense_generated, mode):
    cfg, params = dense
    gen_params, out = dense_generated(mode)
    assert [len(o) for o in out] == [6, 6]
    # the int8 dot and Qwix's dequantize-then-dot run the same int8 weights
    if mode == "int8":
        assert out == dense_generated("int8_qwix")[1]
    logits = _logits(gen_params, jnp.asarray([PROMPTS[0]]), cfg)
    want = _logits(params, jnp.asarray([PROMPTS[0]]), cfg)
    tol = {"int8": 0.05, "int8_qwix": 0.05, "bf16": 0.05, "int8_act": 0.3}[mode]
    assert float(jnp.abs(logits - want).max()) < tol * float(jnp.abs(want).max())


def test_low_bit_readme_model_generates_and_its_experts_are_int8(readme_int8):
    m, gen, out = readme_int8
    lp = gen.params["backbone"]["layers"][0]
    assert all(isinstance(w, quant.QWeight) for w in lp["expert_gate_up"] + lp["fused_down"])
    ref = Generator(readme_model(m.rc, "int8_qwix"), m.params).generate(PROMPTS, 5, eos_ids=[])
    assert out == ref and [len(o) for o in out] == [5, 5]


def test_quant_form_is_saved_with_the_model_and_applied_at_load(readme_int8, tmp_path):
    m, _, ref = readme_int8
    path = models.save_readme(tmp_path / "moe", m.params, m.rc, m.spec, {**m.meta, "quant": "int8"})
    loaded = rj.load(path)
    assert loaded.quant == "int8" and rj.load(path, quant="none").quant == "none"
    gen = loaded.generator()
    assert isinstance(gen.params["backbone"]["embed"], quant.QWeight)
    assert gen.generate(PROMPTS, 5, eos_ids=[]) == ref
    assert loaded.logits(PROMPTS[:1]).shape == (1, len(PROMPTS[0]), m.rc.model.vocab_size)
    with pytest.raises(ConfigError):
        rj.load(path, quant="int4")


def test_stacked_layout_generates_the_trimmed_tokens_from_the_loaded_arrays(readme_int8, tmp_path):
    """layout="stacked": the generator runs the loaded arrays (no second copy) and gives the
    trimmed layout's greedy tokens; in int8 its stacked experts are QWeights and it generates."""
    m, _, _ = readme_int8
    path = models.save_readme(tmp_path / "moe", m.params, m.rc, m.spec, m.meta)
    ref = rj.load(path).generator().generate(PROMPTS, 5, eos_ids=[])
    stacked = rj.load(path, layout="stacked")
    gen = stacked.generator()
    pairs = zip(
        *(jax.tree.leaves(t["backbone"]) for t in (gen.params, stacked.params)), strict=True
    )
    assert all(a is b for a, b in pairs)
    assert gen.generate(PROMPTS, 5, eos_ids=[]) == ref
    low = rj.load(path, quant="int8", layout="stacked").generator()
    assert isinstance(low.params["backbone"]["layers"]["expert_gate_up"], quant.QWeight)
    assert [len(o) for o in low.generate(PROMPTS, 5, eos_ids=[])] == [5, 5]
    with pytest.raises(ConfigError, match="layout"):
        rj.load(path, layout="unrolled")


def _unfused_ffn(lp, x_BxSxD, layer=None):
    gate, up = lp["w_gate_up"][:, 0], lp["w_gate_up"][:, 1]
    return (jax.nn.silu(x_BxSxD @ gate) * (x_BxSxD @ up)) @ lp["w_down"], None


def test_fused_projection_step_greedy_equals_unfused(dense, monkeypatch):
    cfg, params = dense
    fused = Generator(dense_model(cfg), params).generate(PROMPTS, 8, eos_ids=[])

    def step(p, tokens_BxS, cache, num_new_B, last_B=None):
        logits, cache, _ = llama.forward(
            p, tokens_BxS, cfg, cache=cache, num_new_B=num_new_B, last_B=last_B, ffn=_unfused_ffn
        )
        return logits, cache

    H, K = cfg.n_heads, cfg.n_kv_heads
    monkeypatch.setattr(
        llama,
        "qkv_proj",
        lambda h, w: jnp.concatenate(
            [
                jnp.einsum("bsd,dnh->bsnh", h, w[:, a:b])
                for a, b in ((0, H), (H, H + K), (H + K, H + 2 * K))
            ],
            axis=2,
        ),
    )
    base = dense_model(cfg)
    unfused = Generator(DecodeModel(cfg, step, base.new_cache, base.prepare), params)
    assert unfused.generate(PROMPTS, 8, eos_ids=[]) == fused


# The engine's int8 tests share one engine shape (4 slots, context 64, chunks of 8): its steps
# compile once for the module.
ENGINE = dict(max_len=64, num_slots=4, prefill_chunk=8)


def test_engine_serves_int8_weights_as_the_generator_runs_them(readme_int8):
    import dataclasses

    from readme_jax.serve.engine import generate
    from readme_jax.testing import tiny_serve_model

    sm = tiny_serve_model(num_experts=4, seed=0)  # readme_int8's model, split for serving
    sp8 = dataclasses.replace(sm.params, quant="int8")
    full = generate(sp8, PROMPTS, 5, capacity=None, **ENGINE)  # every expert resident: in-graph
    assert full.tokens == readme_int8[2]


def test_offloaded_int8_experts_serve_as_the_all_resident_int8_model_at_a_quarter_of_the_bytes():
    import dataclasses

    from readme_jax.model.sampling import SamplingParams
    from readme_jax.serve.backend import ModelBackend
    from readme_jax.serve.engine import EngineConfig, generate
    from readme_jax.testing import tiny_serve_model

    sm = tiny_serve_model(num_experts=4, seed=0)
    sp8 = dataclasses.replace(sm.params, quant="int8")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 97, int(n)).tolist() for n in rng.integers(3, 24, 6)]
    kw = ENGINE
    for sampling in (SamplingParams(), SamplingParams(1.0, 0, 1.0)):
        full = generate(sp8, prompts, 8, sampling, capacity=None, **kw)  # in-graph int8 experts
        be = ModelBackend.for_config(sp8, EngineConfig(capacity=2, **kw).for_experts(4))
        off = generate(sp8, prompts, 8, sampling, capacity=2, cache_policy="lru", backend=be, **kw)
        assert off.tokens == full.tokens
        # the slots held int8 experts, and each load moved the int8 bytes
        assert all(isinstance(w, quant.QWeight) for w in be.store.slots[0].values())
        assert off.stats["loads"] > 4 and be.store.loads == off.stats["loads"]
        assert off.stats["bytes_moved"] == be.store.bytes_moved
        assert be.store.bytes_moved == off.stats["loads"] * sp8.bytes_per_expert
    # the tiny model (D = 32) carries its f32 scales: a bit under 4x; SmolLM2's width 3.97x
    assert 3.4 < sm.params.bytes_per_expert / sp8.bytes_per_expert < 4
