"""eval/bytes_bench.py on a tiny model: the rows it reports and the compiled-step check that
tells a dequantize fused into its dot from one that writes a float copy of the weight."""

import numpy as np

from readme_jax.decode.steps import dense_model
from readme_jax.eval import bytes_bench
from readme_jax.model import llama
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


def test_run_and_render_dense_and_readme_rows():
    m = tiny_readme(num_experts=3, seed=0)
    cfg = m.rc.model
    dense = np_init(llama.param_shapes(cfg), np.random.default_rng(1))
    c = bytes_bench.BytesBenchConfig(
        modes=("none", "int8"), batches=(1,), steps=5, rounds=1, quality_tokens=0
    )
    res = bytes_bench.run(c, dense_source=(cfg, dense), readme_source=(m.rc, m.params))
    for key in ("dense", "readme"):
        r = res[key]
        assert set(r["tok_s"]) == {"none", "int8"} and r["tok_s"]["int8"]["1"] > 0
        assert r["weight_mb"]["int8"] < 0.5 * r["weight_mb"]["none"]
        assert r["token_mb"]["int8"] < 0.5 * r["token_mb"]["none"]
    # a top-1 Read-ME token reads one fused FFN per layer, not all E experts' weights
    assert res["readme"]["token_mb"]["none"] < 0.6 * res["readme"]["weight_mb"]["none"]
    text = bytes_bench.render(res, "cmd")
    assert text.startswith(bytes_bench.START) and "#### Read-ME" in text
