"""refactor/pipeline.py: the calibrate -> refactor wiring that launch/train.py, serving and the
benchmark share, on a random teacher and real text (tests/fixtures/corpus)."""

import dataclasses
from pathlib import Path

import jax
import numpy as np
import pytest

from readme_jax.checkpoints import models
from readme_jax.checkpoints.errors import CheckpointError
from readme_jax.checkpoints.layers import HFLayers
from readme_jax.model.config import ConfigError
from readme_jax.refactor.construct import Construction, kept_channels, static_channels
from readme_jax.refactor.pipeline import (
    Recipe,
    StaticControl,
    build_readme,
    load_source,
    parse_domains,
)
from readme_jax.testing import random_checkpoint

CORPUS = Path(__file__).resolve().parents[1] / "fixtures" / "corpus"
DOMAINS = f"drama={CORPUS / 'shakespeare'},whaling={CORPUS / 'melville.jsonl'}"


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    cache = tmp_path_factory.mktemp("data")
    ck = random_checkpoint(vocab=49152, dim=32, layers=2, heads=4, kv_heads=2, ffn=64)
    return Recipe(
        checkpoint=ck, domains=DOMAINS, num_sequences=2, seq_len=32, data_cache=str(cache)
    )


def test_build_readme_caches_statistics_and_saves_a_loadable_model(recipe, tmp_path):
    calib = tmp_path / "calib"
    built = build_readme(recipe, calib)
    m = built.model
    assert m.spec.domains == ["drama", "whaling"] and m.rc.moe.num_experts == 2
    rec = m.meta["recipe"]
    assert rec["checkpoint"] == recipe.checkpoint and rec["tokenizer"] == built.tokenizer.name
    assert rec == recipe.describe(built.tokenizer.name)  # the whole recipe, refit included
    assert rec["refit"]["mode"] == "lstsq" and rec["construction"]["shared"] == "intersection"
    assert built.stats.recipe.items() <= rec.items()  # the statistics record their part of it
    stamp = (calib / "stats.json").stat().st_mtime_ns
    again = build_readme(recipe, calib)  # same recipe: the cached statistics are reused
    assert (calib / "stats.json").stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(again.stats.mean_abs_ExLxF, built.stats.mean_abs_ExLxF)
    path = models.save_readme(tmp_path / "moe", m.params, m.rc, m.spec, m.meta)
    back = models.load_readme(path)
    assert back.meta["recipe"] == rec and back.rc == m.rc
    assert models.tokenizer_for(back.meta).name == built.tokenizer.name


def test_clusters_and_remain_rate_follow_the_recipe(recipe):
    src = models.load_dense(recipe.checkpoint, recipe.dtype, recipe.scan_layers, recipe.seed)
    built = build_readme(recipe, source=src)
    narrow = built.model
    # the same statistics at another remain rate (build_readme(stats=...) skips calibration)
    wide = build_readme(
        dataclasses.replace(recipe, remain_rate=0.75), source=src, stats=built.stats
    ).model
    assert wide.spec.remain_rate == 0.75 and narrow.spec.remain_rate == 0.5
    assert wide.spec.domain_masks_ExLxF.sum() > narrow.spec.domain_masks_ExLxF.sum()
    k3 = build_readme(dataclasses.replace(recipe, clusters=3), source=src)
    assert k3.model.spec.num_experts == 3 and k3.model.meta["recipe"]["clusters"] == 3
    c3 = build_readme(dataclasses.replace(recipe, clusters=3, cluster_chunk=8), source=src)
    assert c3.model.meta["recipe"]["cluster_chunk"] == 8 and c3.model.spec.num_experts == 3
    assert c3.stats.recipe["cluster_chunk"] == 8  # context clusters are their own statistics


def test_a_construction_and_its_static_control_share_the_rule(recipe, tmp_path):
    con = Construction("frequency", "core", "partition", 0.5)
    r = dataclasses.replace(recipe, construction=con, static_control=True)
    built = build_readme(r)
    spec, F = built.model.spec, built.dense_cfg.ffn_dim
    k = kept_channels(0.5, F)
    assert (spec.shared_widths + spec.expert_widths.max(-1) == k).all()
    ctrl = built.static
    assert ctrl.kept_LxK.shape == (2, k) and ctrl.w_down_LxKxD.shape == (2, k, 32)
    np.testing.assert_array_equal(
        ctrl.kept_LxK, static_channels(built.stats.groups(), "frequency", k)
    )
    built.save(tmp_path / "moe")
    back = StaticControl.load(tmp_path / "moe")
    np.testing.assert_array_equal(back.kept_LxK, ctrl.kept_LxK)
    np.testing.assert_array_equal(back.w_down_LxKxD, ctrl.w_down_LxKxD)
    params, width = back.params(models.load_dense(r.checkpoint)[1])
    assert width == k and params["layers"]["w_down"].shape == (2, k, 32)
    assert (
        models.load_readme(tmp_path / "moe").meta["recipe"]["construction"]["score"] == "frequency"
    )
    assert StaticControl.load(tmp_path) is None


def test_parse_domains_needs_two():
    assert parse_domains("a, b=/x") == {"a": None, "b": "/x"}
    with pytest.raises(ValueError, match="at least 2 domains"):
        parse_domains("only")


def test_experts_built_around_a_trained_router(recipe, tmp_path):
    """refactor.cluster_router: the calibration tokens grouped by a saved model's router, the
    experts built and refit on those groups, and the new model starts from that router."""
    from readme_jax.refactor.cluster import router_assign

    src = models.load_dense(recipe.checkpoint, recipe.dtype, recipe.scan_layers, recipe.seed)
    k3 = build_readme(dataclasses.replace(recipe, clusters=3), source=src).model
    # a router that is not the init of a fresh build: perturb its head
    k3.params["router"]["head"] = k3.params["router"]["head"] * 50.0
    path = models.save_readme(tmp_path / "r", k3.params, k3.rc, k3.spec, k3.meta)
    r = dataclasses.replace(recipe, clusters=3, cluster_router=str(path))
    built = build_readme(r, source=src)
    m = built.model
    assert m.meta["recipe"]["cluster_router"] == str(path) and m.spec.num_experts == 3
    np.testing.assert_array_equal(m.params["router"]["head"], k3.params["router"]["head"])
    # the statistics' groups are the router's top-1 choices
    rows = [b for bs in r.batches(src[2]).values() for b in bs]
    g = np.concatenate(
        [x.ravel() for x in router_assign(k3.params["router"], k3.rc.router, src[0], rows)]
    )
    assert built.stats.n_tokens == [int((g == e).sum()) for e in range(3)]
    with pytest.raises(ConfigError, match="num_clusters=3"):
        build_readme(dataclasses.replace(r, clusters=2), source=src)
    with pytest.raises(ConfigError, match="refactor.clustering"):
        dataclasses.replace(recipe, cluster_router=str(path)).check()


def test_layers_read_from_the_checkpoint_files_build_the_same_model(tmp_path):
    """model.layers_on_disk: the calibrate and refactor stages read a Hugging Face checkpoint's
    layers one at a time and build the model that the whole loaded checkpoint builds."""
    ck = Path(__file__).resolve().parents[1] / "fixtures" / "load_llama2"
    r = Recipe(checkpoint=str(ck), domains=DOMAINS, num_sequences=2, seq_len=32,
               data_cache=str(tmp_path / "data"))  # fmt: skip
    lazy = dataclasses.replace(r, layers_on_disk=True)
    assert isinstance(load_source(lazy)[1]["layers"], HFLayers)
    a, b = build_readme(r).model, build_readme(lazy).model
    assert a.meta["recipe"] == b.meta["recipe"]
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="refactor.clustering"):
        dataclasses.replace(lazy, clusters=2).check()
    rand = dataclasses.replace(
        lazy, checkpoint="random:vocab=64,dim=32,layers=2,heads=4,kv_heads=2,ffn=64"
    )
    with pytest.raises(CheckpointError, match="Hugging Face directory"):
        load_source(rand)
