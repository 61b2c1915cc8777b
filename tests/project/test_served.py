"""The one served-model door (readme_jax.served.load_served) on real saved tiny models: a run
directory (moe_trained, else moe_init), a Read-ME checkpoint, a dense checkpoint, and the default
(the newest trained run of the default config, else the model refactored on the fly, named
untrained)."""

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from readme_jax import cli
from readme_jax.checkpoints import models
from readme_jax.checkpoints.errors import CheckpointError
from readme_jax.refactor.pipeline import Recipe
from readme_jax.serve.model import default_trained_run, resolve
from readme_jax.served import UNTRAINED_NAME, load_served, on_the_fly_recipe
from readme_jax.testing import random_checkpoint, tiny_readme

CORPUS = Path(__file__).resolve().parents[1] / "fixtures" / "corpus"
DOMAINS = f"drama={CORPUS / 'shakespeare'},whaling={CORPUS / 'melville.jsonl'}"
RANDOM = random_checkpoint(vocab=49152, dim=32, layers=2, heads=4, kv_heads=2, ffn=64)


def _run(root, name, config_name="smollm2_135m", checkpoint="", trained=True, age=0.0, seed=0):
    run = root / name
    run.mkdir(parents=True)
    cfg = {"name": config_name, "model": {"checkpoint": checkpoint}}
    (run / "config.json").write_text(json.dumps(cfg))
    m = tiny_readme(seed=seed)
    sub = run / ("moe_trained" if trained else "moe_init")
    models.save_readme(sub, m.params, m.rc, m.spec, m.meta)
    t = time.time() - age
    os.utime(sub, (t, t))
    return sub


def test_a_run_directory_serves_its_trained_model_else_its_initial_one(tmp_path):
    init = _run(tmp_path, "r", trained=False, seed=1)
    assert resolve(init.parent) == ("readme", str(init))
    sm = load_served(init.parent)
    assert sm.name == "readme-r" and sm.source == str(init) and not sm.note
    trained = init.parent / "moe_trained"
    m = tiny_readme(seed=2)
    models.save_readme(trained, m.params, m.rc, m.spec, m.meta)
    assert resolve(init.parent) == ("readme", str(trained))
    assert load_served(init.parent).source == str(trained)


def test_a_readme_checkpoint_and_a_dense_checkpoint(tmp_path):
    m = tiny_readme()
    ck = models.save_readme(tmp_path / "my_moe", m.params, m.rc, m.spec, m.meta)
    sm = load_served(ck)
    assert sm.name == "readme-my_moe" and sm.params.num_experts == 4 and sm.spec is not None
    dense = load_served(RANDOM)
    assert resolve(RANDOM) == ("dense", RANDOM)
    assert dense.params.num_experts == 1 and dense.spec is None and dense.name == "dense-random"
    assert "served with no expert cache" in dense.source and dense.tokenizer is not None
    with pytest.raises(CheckpointError, match="not found"):
        load_served(tmp_path / "missing")


def test_default_is_the_newest_trained_run_of_the_default_config(tmp_path):
    _run(tmp_path, "old", age=100.0)
    new = _run(tmp_path, "new", age=1.0)
    _run(tmp_path, "not_default", config_name="tiny")  # newer, but another config
    _run(tmp_path, "other_model", checkpoint="some/hf_dir")
    assert default_trained_run(tmp_path) == new
    sm = load_served(None, runs=tmp_path)
    assert sm.source == str(new) and sm.name == "readme-new" and str(new) in sm.note


def test_no_trained_run_means_the_on_the_fly_build_named_untrained(tmp_path, monkeypatch):
    monkeypatch.setenv("READMEJAX_CACHE_DIR", str(tmp_path / "cache"))
    _run(tmp_path, "only_init", trained=False)
    recipe = Recipe(
        checkpoint=RANDOM,
        domains=DOMAINS,
        num_sequences=2,
        seq_len=32,
        data_cache=str(tmp_path / "data"),
        dispatch="select",
    )
    assert default_trained_run(tmp_path) is None
    sm = load_served("", runs=tmp_path, recipe=recipe)
    assert sm.name == UNTRAINED_NAME and "UNTRAINED" in sm.note and "UNTRAINED" in sm.source
    assert sm.params.num_experts == 2 and sm.spec.domains == ["drama", "whaling"]
    assert any((tmp_path / "cache" / "serve").iterdir())  # statistics cached for the next start
    kept = [d for d in (tmp_path / "cache" / "serve").iterdir() if d.name.startswith("model-")]
    assert len(kept) == 1 and (kept[0] / "model.json").exists()  # the build itself is kept
    again = load_served("", runs=tmp_path, recipe=recipe)  # loaded from the cache, not rebuilt
    assert again.name == UNTRAINED_NAME and str(kept[0]) in again.source
    np.testing.assert_array_equal(again.spec.expert_idx_LxExFe, sm.spec.expert_idx_LxExFe)
    dense = load_served("", dense=True, runs=tmp_path)
    assert dense.name == "dense-smollm2-135m" and dense.params.num_experts == 1


def test_the_on_the_fly_build_is_the_default_configs_recipe():
    """What serving builds on the fly and what `launch/train.py` builds from the default run
    config record the same recipe in model.json (the serve config's defaults included)."""
    root = Path(__file__).resolve().parents[2] / "configs"
    run_cfg = cli.parse_config(root / "smollm2_135m.py", [])
    serve_cfg = cli.parse_config(root / "serve.py", [])
    trained = Recipe.from_config(run_cfg)
    fly = on_the_fly_recipe(
        serve_cfg.domains, serve_cfg.remain_rate, serve_cfg.calib_sequences, serve_cfg.calib_len
    )
    assert fly.describe("tok") == trained.describe("tok")
    assert fly == on_the_fly_recipe()  # the library's defaults are the config's
