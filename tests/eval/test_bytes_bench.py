"""eval/bytes_bench.py and serve/bench/offload.py on a tiny model: the rows they report, the
compiled-step check that tells a dequantize fused into its dot from one that writes a float copy
of the weight, and the int8 numbers of the offload store's form."""

import functools

import numpy as np

from readme_jax.decode.steps import dense_model
from readme_jax.eval import bytes_bench
from readme_jax.model import llama
from readme_jax.serve.bench import offload
from readme_jax.testing import np_init, tiny_llama_config, tiny_readme


def test_step_bytes_sees_the_dequantized_weight_copies_of_qwix_only():
    cfg = tiny_llama_config().replace(scan_layers=False)
    params = np_init(llama.param_shapes(cfg), np.random.default_rng(0))
    got = {}
    for mode in ("none", "int8", "int8_qwix"):
        m = dense_model(cfg, mode)
        got[mode] = bytes_bench.step_bytes(m, m.prepare(params))
    assert got["none"]["dequantized_weights"] == got["int8"]["dequantized_weights"] == 0
    # Qwix's float-input path writes an f32 copy of every int8 weight on XLA:CPU
    assert got["int8_qwix"]["dequantized_weights"] >= cfg.n_layers * 4
    assert got["int8"]["accessed_mb"] < got["none"]["accessed_mb"] < got["int8_qwix"]["accessed_mb"]


def test_run_and_render_dense_and_readme_rows(monkeypatch):
    # the bandwidth probe over 1 MiB, not 1 GiB (1.2 s and a 1 GiB array): it still runs and
    # is rendered; no row checked here depends on its figure
    probe = functools.partial(bytes_bench.read_bandwidth_gbs, 1 << 20)
    monkeypatch.setattr(bytes_bench, "read_bandwidth_gbs", probe)
    m = tiny_readme(num_experts=3, seed=0)
    cfg = m.rc.model
    dense = np_init(llama.param_shapes(cfg), np.random.default_rng(1))
    c = bytes_bench.BytesBenchConfig(
        modes=("none", "int8"),
        batches=(1,),
        steps=5,
        rounds=1,
        quality_tokens=0,
    )
    res = bytes_bench.run(c, dense_source=(cfg, dense), readme_source=(m.rc, m.params))
    for key in ("dense", "readme"):
        r = res[key]
        assert set(r["tok_s"]) == {"none", "int8"} and r["tok_s"]["int8"]["1"] > 0
        assert r["weight_mb"]["int8"] < 0.5 * r["weight_mb"]["none"]
        assert r["token_mb"]["int8"] < 0.5 * r["token_mb"]["none"]
    # a top-1 Read-ME token reads one fused FFN per layer, not all E experts' weights
    assert res["readme"]["token_mb"]["none"] < 0.6 * res["readme"]["weight_mb"]["none"]
    assert res["bandwidth_gbs"] > 0
    text = bytes_bench.render(res, "cmd")
    assert text.startswith(bytes_bench.START) and "#### Read-ME" in text


def test_offload_rows_count_a_quarter_of_the_f32_expert_bytes_per_token():
    from readme_jax.testing import tiny_serve_model

    sm = tiny_serve_model(num_experts=4, seed=0)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 97, 12).tolist() for _ in range(4)]
    o = offload.offload_bytes(sm.params, prompts, 6, capacity=2)
    f32, q8 = o["forms"]["none"], o["forms"]["int8"]
    assert f32["loads"] > 0 and f32["same_tokens"] == q8["same_tokens"] == 4
    # the same tokens route to the same experts: the same loads, each int8 load ~1/4 the bytes
    assert q8["loads"] == f32["loads"]
    ratio = f32["bytes_per_token"] / q8["bytes_per_token"]
    assert ratio == f32["bytes_per_expert"] / q8["bytes_per_expert"] and 3.4 < ratio < 4
    assert q8["a100_s"] < f32["a100_s"] and q8["experts_in_f32_slots"] >= 6
    assert "Offload engine: C = 2 of 4" in "\n".join(offload.render_offload(o))
    synthetic = offload.offload_prompts(3, 5, "synthetic", "", None, 97)
    assert len(synthetic) == 3 and len(set(map(tuple, synthetic))) == 3


def test_store_form_holds_the_numbers_the_offload_store_moves():
    import dataclasses

    from readme_jax.model import quant
    from readme_jax.serve.decode import split_params

    m = tiny_readme(num_experts=3, seed=0)
    fq = bytes_bench.store_form(m.params)
    sp = dataclasses.replace(split_params(m.rc, m.params), quant="int8")
    for key in ("gate_up", "down"):
        want = np.asarray(quant.dequantize(sp.store_experts[key]))  # [E, L, ...]
        got = np.asarray(fq["backbone"]["layers"][f"expert_{key}"])  # [L, E, ...]
        np.testing.assert_allclose(np.moveaxis(got, 0, 1), want, rtol=1e-6, atol=1e-8)
    f32 = np.asarray(m.params["backbone"]["layers"]["shared_down"])
    assert not np.array_equal(np.asarray(fq["backbone"]["layers"]["shared_down"]), f32)
    assert np.array_equal(fq["router"]["embed"], m.params["router"]["embed"])  # router stays f32
