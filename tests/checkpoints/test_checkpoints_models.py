"""The one door for models on disk: what a path holds, round trips, the tokenizer rule."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

import readme_jax as rj
from readme_jax.checkpoints import models, store
from readme_jax.checkpoints.errors import CheckpointError
from readme_jax.checkpoints.gguf import default_gguf_path
from readme_jax.testing import random_checkpoint, tiny_readme

GQA = Path(__file__).resolve().parents[1] / "fixtures" / "llama_gqa"


def test_discover_names_each_kind_by_content_not_suffix(tmp_path):
    assert models.discover(None) == models.Found("gguf", None, "")
    assert models.discover(models.BUNDLED).kind == "gguf"
    assert models.discover(random_checkpoint(vocab=10, dim=8)).kind == "random"
    assert models.discover(GQA).kind == "hf"
    renamed = tmp_path / "weights.bin"  # a GGUF under another name is still a GGUF
    renamed.symlink_to(default_gguf_path())
    assert models.discover(renamed) == models.Found("gguf", renamed, str(renamed))
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        models.discover(fake)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        models.discover(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="not a GGUF file, a Hugging Face directory"):
        models.discover(tmp_path)


def test_interrupted_save_is_reported_as_such(tmp_path):
    m = tiny_readme(num_experts=3)
    path = models.save_readme(tmp_path / "moe", m.params, m.rc, m.spec, m.meta)
    assert models.discover(path).kind == "readme_moe" and models.exists(path)
    (path / "model.json").unlink()  # what a save killed before its last write leaves
    assert not models.exists(path)
    with pytest.raises(CheckpointError, match="interrupted save"):
        models.discover(path)
    with pytest.raises(CheckpointError, match="interrupted save"):
        models.load_readme(path)


def test_readme_round_trip_and_the_front_door(tmp_path):
    m = tiny_readme(num_experts=3, seed=1)
    path = models.save_readme(tmp_path / "moe", m.params, m.rc, m.spec, m.meta)
    back = models.load_readme(path)
    assert back.rc == m.rc and back.spec.domains == m.spec.domains
    np.testing.assert_array_equal(back.spec.expert_idx_LxExFe, m.spec.expert_idx_LxExFe)
    for a, b in zip(jax.tree.leaves(back.params), jax.tree.leaves(m.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert models.list_models(tmp_path) == [path]
    with pytest.raises(CheckpointError, match="not a dense model"):
        models.load_dense(path)
    loaded = rj.load(path)  # the public API goes through the same door
    # the config as saved, plus every end id of the source tokenizer (SmolLM2: 2 and 0)
    assert loaded.is_moe and loaded.readme == m.rc.replace(
        model=m.rc.model.replace(eos_ids=loaded.tokenizer.eos_ids)
    )
    assert loaded.tokenizer.name == models.tokenizer_for({}).name  # random source: bundled


def test_dense_directory_and_random_spec(tmp_path):
    ck = random_checkpoint(vocab=64, dim=16, layers=2, heads=2, kv_heads=1, ffn=32)
    cfg, params, tok = models.load_dense(ck, seed=3)
    assert (cfg.vocab_size, cfg.dim, cfg.n_layers, cfg.ffn_dim) == (64, 16, 2, 32)
    path = models.save_dense(tmp_path / "dense", params, cfg, {"recipe": {"checkpoint": ck}})
    assert models.discover(path).kind == "dense"
    cfg2, params2, tok2 = models.load_dense(path)
    assert cfg2 == cfg and tok2.name == tok.name
    np.testing.assert_array_equal(np.asarray(params2["embed"]), np.asarray(params["embed"]))
    with pytest.raises(CheckpointError, match="bad random checkpoint"):
        models.load_dense("random:vocab=sixty")
    with pytest.raises(CheckpointError, match="lacks"):
        models.load_dense("random:vocab=64")


def test_tokenizer_follows_the_recipe_source():
    bundled = models.tokenizer_for({"recipe": {"checkpoint": models.BUNDLED}})
    assert models.tokenizer_for({"recipe": {"checkpoint": "random:vocab=1"}}).name == bundled.name
    with pytest.raises(CheckpointError, match="llama_gqa: no tokenizer files"):  # the source's own
        models.tokenizer_for({"recipe": {"checkpoint": str(GQA)}})  # (the fixture has none)


def _largest_param_file(path: Path) -> Path:
    return max((path / "params").rglob("*"), key=lambda f: f.stat().st_size if f.is_file() else 0)


def test_damaged_bytes_in_a_saved_model_are_named_at_load(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("READMEJAX_CACHE_DIR", str(tmp_path / "cache"))
    m = tiny_readme(num_experts=3, seed=2)
    path = models.save_readme(tmp_path / "moe", m.params, m.rc, m.spec, m.meta)
    listed = json.loads((path / store.MANIFEST).read_text())["files"]
    assert any(k.startswith("experts/") for k in listed)
    assert any(k.startswith("params/") for k in listed) and store.MODEL_JSON not in listed
    models.load_readme(path)  # verified, and its files' identities recorded
    calls = []
    real = store._sha256
    monkeypatch.setattr(store, "_sha256", lambda f: calls.append(f) or real(f))
    models.load_readme(path)
    assert calls == []  # unchanged files: not hashed again
    data = _largest_param_file(path)
    raw = bytearray(data.read_bytes())
    mid = len(raw) // 2
    raw[mid : mid + 64] = bytes(64)
    data.write_bytes(bytes(raw))  # same size: only the content check can see it
    for load in (models.load_readme, rj.load):
        with pytest.raises(CheckpointError, match="differs from its checksum") as e:
            load(path)
        assert str(data) in str(e.value)
    monkeypatch.setenv("READMEJAX_VERIFY", "0")  # the check can be skipped
    calls.clear()
    try:
        models.load_readme(path)
    except CheckpointError as e:  # orbax may still refuse the bytes, but not by checksum
        assert "checksum" not in str(e)
    assert calls == []


def test_a_model_saved_before_manifests_loads_unverified(tmp_path, caplog):
    m = tiny_readme(num_experts=3, seed=3)
    path = models.save_readme(tmp_path / "old", m.params, m.rc, m.spec, m.meta)
    (path / store.MANIFEST).unlink()
    with caplog.at_level("WARNING", logger=store.__name__):
        back = models.load_readme(path)
    assert back.rc == m.rc
    lines = [r.getMessage() for r in caplog.records if "unverified" in r.getMessage()]
    assert len(lines) == 1 and str(path) in lines[0] and "\n" not in lines[0]
