"""Loading and saving Hugging Face Llama directories (readme_jax/checkpoints/hf.py).

Bad copies of the committed fixtures are built in tmp_path; each must fail with an error that
names the problem.
"""

from __future__ import annotations

import json
import shutil
import struct
import tracemalloc
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from readme_jax.checkpoints.errors import CheckpointError
from readme_jax.checkpoints.hf import load_hf, read_safetensors_header, read_tensor, save_hf
from readme_jax.model.config import ConfigError
from readme_jax.model.llama import param_shapes

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
GQA = FIXTURES / "llama_gqa"
TIED = FIXTURES / "llama3_tied"


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def _edit_config(d: Path, **changes) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def _shapes(params):
    return jax.tree.map(lambda a: tuple(a.shape), params)


# --- good input ------------------------------------------------------------------------------


@pytest.mark.parametrize("src", [GQA, TIED])
def test_loaded_tree_has_the_configured_shapes(src):
    cfg, params = load_hf(src)
    assert _shapes(params) == param_shapes(cfg)
    assert ("lm_head" in params) == (not cfg.tie_embeddings)
    assert all(a.dtype == np.float32 for a in jax.tree.leaves(params))


def test_weights_land_transposed_in_our_layout():
    cfg, params = load_hf(GQA)
    hf = load_file(GQA / "model.safetensors")
    H, K, hd, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.dim
    p = "model.layers.1."
    wqkv = np.asarray(params["layers"]["wqkv"][1])
    np.testing.assert_array_equal(
        wqkv[:, :H].reshape(D, H * hd), hf[p + "self_attn.q_proj.weight"].T
    )
    np.testing.assert_array_equal(
        wqkv[:, H + K :].reshape(D, K * hd), hf[p + "self_attn.v_proj.weight"].T
    )
    np.testing.assert_array_equal(
        np.asarray(params["layers"]["wo"][1]).reshape(H * hd, D),
        hf[p + "self_attn.o_proj.weight"].T,
    )
    np.testing.assert_array_equal(
        params["layers"]["w_gate_up"][1, :, 1], hf[p + "mlp.up_proj.weight"].T
    )
    np.testing.assert_array_equal(params["layers"]["w_down"][1], hf[p + "mlp.down_proj.weight"].T)
    np.testing.assert_array_equal(params["lm_head"], hf["lm_head.weight"].T)


def test_loading_never_holds_two_copies_of_the_model():
    load_hf(GQA)  # warm imports and caches so only the load itself is traced
    tracemalloc.start()
    try:
        _, params = load_hf(GQA)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    total = sum(a.nbytes for a in jax.tree.leaves(params))
    # On CPU the jax arrays alias the filled numpy groups, so one copy is ~1x; reading all
    # tensors before placing them, or keeping the groups after device_put, would reach ~2x.
    assert peak < 1.4 * total, (peak, total)


def test_sliding_window_caps_the_context(tmp_path):
    # Mistral-style sliding-window attention is exact full attention up to the window.
    d = _copy(GQA, tmp_path)
    _edit_config(d, architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=64)
    assert load_hf(d)[0].max_seq_len == 64


def test_header_reader_agrees_with_safetensors_library():
    ours = read_safetensors_header(GQA / "model.safetensors")
    theirs = load_file(GQA / "model.safetensors")
    assert set(ours) == set(theirs)
    for name, info in ours.items():
        np.testing.assert_array_equal(read_tensor(info), theirs[name])


def test_bfloat16_load_and_round_trip(tmp_path):
    cfg, p32 = load_hf(TIED)
    cfg16, p16 = load_hf(TIED, dtype="bfloat16")
    assert cfg16.dtype == "bfloat16"
    assert all(a.dtype == ml_dtypes.bfloat16 for a in jax.tree.leaves(p16))
    out = save_hf(tmp_path / "bf16", cfg16, p16)
    header = read_safetensors_header(out / "model.safetensors")
    assert {i.dtype for i in header.values()} == {"BF16"}
    cfg_back, p_back = load_hf(out, dtype="float32")  # bf16 file, read up to f32
    assert cfg_back == cfg
    for a, b in zip(jax.tree.leaves(p16), jax.tree.leaves(p_back), strict=True):
        np.testing.assert_array_equal(np.asarray(a, np.float32), b)
    for a, b in zip(jax.tree.leaves(p32), jax.tree.leaves(p_back), strict=True):
        np.testing.assert_allclose(b, a, rtol=2**-8, atol=0)


@pytest.mark.parametrize("max_shard_bytes", [None, 40_000])
def test_save_then_load_is_exact(tmp_path, max_shard_bytes):
    cfg, params = load_hf(GQA)
    out = save_hf(tmp_path / "rt", cfg, params, max_shard_bytes=max_shard_bytes)
    assert (out / "model.safetensors.index.json").exists() == (max_shard_bytes is not None)
    cfg2, params2 = load_hf(out)
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params, params2)


def test_legacy_rope_scaling_config_loads_the_same(tmp_path):
    # Llama-3.x checkpoints written by transformers v4 carry rope_scaling + top-level rope_theta.
    d = _copy(TIED, tmp_path)
    hf = json.loads((d / "config.json").read_text())
    rp = hf.pop("rope_parameters")
    hf["rope_theta"] = rp.pop("rope_theta")
    hf["rope_scaling"] = rp
    (d / "config.json").write_text(json.dumps(hf))
    assert load_hf(d)[0] == load_hf(TIED)[0]


def test_tied_checkpoint_with_redundant_lm_head_loads(tmp_path):
    d = _copy(GQA, tmp_path)
    _edit_config(d, tie_word_embeddings=True)
    cfg, params = load_hf(d)
    assert cfg.tie_embeddings and "lm_head" not in params


# --- bad input -------------------------------------------------------------------------------


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        load_hf(tmp_path / "nope")


def test_missing_config(tmp_path):
    d = _copy(GQA, tmp_path)
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_hf(d)


def test_invalid_config_json(tmp_path):
    d = _copy(GQA, tmp_path)
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        load_hf(d)


def test_no_safetensors(tmp_path):
    d = _copy(GQA, tmp_path)
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors.*pytorch_model\.bin"):
        load_hf(d)


@pytest.mark.parametrize("keep", [5, 300, 200_000])
def test_truncated_safetensors(tmp_path, keep):
    d = _copy(GQA, tmp_path)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:keep])
    with pytest.raises(CheckpointError, match="truncated") as e:
        load_hf(d)
    assert "model.safetensors" in str(e.value)


def test_corrupt_header(tmp_path):
    d = _copy(GQA, tmp_path)
    f = d / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[8:24] = b"\xff" * 16
    f.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt safetensors header"):
        load_hf(d)


def test_header_offsets_disagree_with_shape(tmp_path):
    d = _copy(GQA, tmp_path)
    f = d / "model.safetensors"
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header["model.norm.weight"]["shape"] = [65]
    new = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(new) == n
    f.write_bytes(raw[:8] + new + raw[8 + n :])
    with pytest.raises(CheckpointError, match="corrupt.*'model.norm.weight'"):
        load_hf(d)


def test_missing_tensor_is_named(tmp_path):
    d = _copy(GQA, tmp_path)
    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="missing tensors: model.layers.1.mlp.up_proj.weight"):
        load_hf(d)


def test_untied_config_without_lm_head_names_it(tmp_path):
    d = _copy(TIED, tmp_path)
    _edit_config(d, tie_word_embeddings=False)
    with pytest.raises(CheckpointError, match="missing tensors: lm_head.weight"):
        load_hf(d)


def test_shape_mismatch_names_tensor_and_shapes(tmp_path):
    d = _copy(GQA, tmp_path)
    _edit_config(d, intermediate_size=96)
    with pytest.raises(CheckpointError) as e:
        load_hf(d)
    msg = str(e.value)
    assert "model.layers.0.mlp.gate_proj.weight" in msg
    assert "[128, 64]" in msg and "[96, 64]" in msg


def test_fewer_layers_in_config_than_in_weights(tmp_path):
    d = _copy(TIED, tmp_path)
    _edit_config(d, num_hidden_layers=2)
    with pytest.raises(CheckpointError, match="does not account for.*model.layers.2"):
        load_hf(d)


def test_missing_shard(tmp_path):
    d = _copy(TIED, tmp_path)
    (d / "model-00003-of-00006.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing.*model-00003-of-00006.safetensors"):
        load_hf(d)


def test_unsupported_architecture(tmp_path):
    d = _copy(GQA, tmp_path)
    _edit_config(d, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(ConfigError, match="unsupported architecture.*GPT2LMHeadModel") as e:
        load_hf(d)
    assert "config.json" in str(e.value)


def test_unsupported_variant_with_biases(tmp_path):
    d = _copy(GQA, tmp_path)
    _edit_config(d, attention_bias=True)
    with pytest.raises(ConfigError, match="attention_bias"):
        load_hf(d)


def test_errors_are_value_errors():
    assert issubclass(CheckpointError, ValueError) and issubclass(ConfigError, ValueError)


def test_write_hf_streams_tensors_that_load_back_and_transformers_can_shard(tmp_path):
    from readme_jax.checkpoints.hf import write_hf

    cfg, params = load_hf(GQA)
    made = []

    def tensor(name, shape):  # the saved model's own tensors, in HF's layout, one at a time
        made.append(name)
        return read_tensor(read_safetensors_header(src / file_of[name])[name])

    src = save_hf(tmp_path / "src", cfg, params, max_shard_bytes=40_000)
    file_of = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    out = write_hf(tmp_path / "w", cfg, tensor, max_shard_bytes=40_000)
    assert len(list(out.glob("model-*.safetensors"))) > 1
    assert made[0] == "model.embed_tokens.weight" and len(made) == len(set(made))
    cfg2, params2 = load_hf(out)
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params, params2)
