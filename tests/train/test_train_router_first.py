"""train/router_first.py: the router trained first over k-means clusters (RUN/route/), the
experts built around its partition with the run's own construction, trained with it frozen;
the same functions launch/train.py calls, on a random teacher and real text."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from train_helpers import make_config

from readme_jax.checkpoints import models
from readme_jax.model.config import ConfigError
from readme_jax.refactor.stage import calibrate_and_refactor
from readme_jax.testing import random_checkpoint
from readme_jax.train.config import resolve
from readme_jax.train.router_first import route_config, train_router_first, use_router_first

CORPUS = Path(__file__).resolve().parents[1] / "fixtures" / "corpus"
DOMAINS = {"drama": str(CORPUS / "shakespeare"), "whaling": str(CORPUS / "melville.jsonl")}


def _config(tmp_path: Path):
    c = make_config(tmp_path, DOMAINS)
    c.model.checkpoint = random_checkpoint(vocab=49152, dim=32, layers=2, heads=4, kv_heads=2,
                                           ffn=64)  # fmt: skip
    c.calib.num_sequences, c.calib.seq_len = 2, 32
    c.refactor.update(clustering=True, num_clusters=3, shared="core", router_first_steps=2)
    c.train.update(rounds=1, expert_steps=1, batch_size=2, router_lr=5e-2)
    return c


def _router(path: Path) -> dict:
    return models.load_readme(path).params["router"]


def _same(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                                                   strict=True))  # fmt: skip


def test_router_first_builds_experts_around_a_trained_router_and_keeps_it_frozen(tmp_path):
    """(The main training's expert phase leaves the router bit-identical: test_train_loop's
    frozen-parameter test; here its schedule has no router phase.)"""
    c = _config(tmp_path)
    run = Path(c.run_dir)
    out = use_router_first(c, run)
    assert c.train.router_steps == 0 and c.refactor.cluster_router == str(out)
    assert [p for _, p, _ in resolve(c).schedule()] == ["expert"]
    train_router_first(c, run)
    calibrate_and_refactor(c, run)
    route = run / "route"
    # the route stage: k-means experts (intersection rule), a router trained 2 steps, no experts
    rec = models.load_readme(route / "moe_init").meta["recipe"]
    assert rec["clusters"] == 3 and rec["construction"]["shared"] == "intersection"
    assert "cluster_router" not in rec
    assert not _same(_router(route / "moe_init"), _router(out))  # trained
    phases = [json.loads(x)["phase"] for x in (route / "train/readme/metrics.jsonl").open()]
    assert phases == ["router", "router"]
    # the run: built around that router with its own construction, router frozen in training
    main = models.load_readme(run / "moe_init").meta["recipe"]
    assert main["cluster_router"] == str(out) and main["construction"]["shared"] == "core"
    assert _same(_router(run / "moe_init"), _router(out))


def test_router_first_needs_clustered_experts(tmp_path):
    c = _config(tmp_path)
    c.refactor.clustering = False
    with pytest.raises(ConfigError, match="refactor.clustering=True"):
        route_config(c, Path(c.run_dir))
    c.refactor.clustering = True
    r = route_config(c, Path(c.run_dir)).refactor  # the measured router's targets, pinned
    assert (r.score, r.shared, r.calib_sequences) == ("magnitude", "intersection", 8)
    c.train.baselines = "layerwise,static"  # its gates would never train
    with pytest.raises(ConfigError, match="baselines=static"):
        use_router_first(c, Path(c.run_dir))
