"""GGUF loading: q/k un-permutation and clear errors for bad files."""

import numpy as np
import pytest

from readme_jax.checkpoints.errors import CheckpointError
from readme_jax.checkpoints.gguf import _unpermute, default_gguf_path, load_gguf
from readme_jax.model.config import ConfigError


def _permute(w, n_heads):  # what llama.cpp's converter does to q/k
    out, inp = w.shape
    return w.reshape(n_heads, 2, out // n_heads // 2, inp).swapaxes(1, 2).reshape(out, inp)


def test_unpermute_inverts_llama_cpp_permutation():
    w = np.random.default_rng(0).normal(size=(3 * 8, 5))
    np.testing.assert_array_equal(_unpermute(_permute(w, 3), 3), w)
    assert not np.array_equal(_permute(w, 3), w)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_gguf(tmp_path / "nope.gguf")


def test_truncated_gguf_is_rejected(tmp_path):
    src = default_gguf_path()
    bad = tmp_path / "trunc.gguf"
    with open(src, "rb") as f:
        bad.write_bytes(f.read(5_000_000))
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_gguf(bad)


def test_corrupt_header_is_rejected(tmp_path):
    bad = tmp_path / "junk.gguf"
    bad.write_bytes(b"NOTAGGUF" + bytes(1000))
    with pytest.raises(CheckpointError, match="not a readable GGUF"):
        load_gguf(bad)


def test_config_disagreeing_with_weights_is_rejected():
    with pytest.raises(CheckpointError, match="has shape"):
        load_gguf(None, ffn_dim=1024)  # the file's FFN is 1536 wide


def test_unsupported_architecture(tmp_path):
    import gguf

    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ConfigError, match="unsupported GGUF architecture 'gpt2'"):
        load_gguf(path)


def test_default_path_exists():
    p = default_gguf_path()
    assert p.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and p.stat().st_size > 50_000_000
