"""The router target moved towards the document's domain label (train.domain_target)."""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_helpers import build, first_router_loss

from configs import smollm2_135m
from readme_jax.checkpoints import models
from readme_jax.refactor.pipeline import parse_domains
from readme_jax.train import config as train_config
from readme_jax.train import context, losses


def test_mix_is_the_identity_at_zero_and_the_label_at_one():
    target = jax.nn.softmax(jax.random.normal(jax.random.key(0), (2, 5, 4)), -1)
    domain = jnp.asarray([[0] * 5, [3] * 5])
    assert losses.mix_domain_target(target, domain, 0.0) is target
    np.testing.assert_allclose(
        losses.mix_domain_target(target, domain, 1.0), jax.nn.one_hot(domain, 4)
    )
    mixed = losses.mix_domain_target(target, domain, 0.25)
    np.testing.assert_allclose(mixed.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(mixed[1, :, 3], 0.75 * target[1, :, 3] + 0.25, rtol=1e-6)
    # the layer-wise baseline's per-layer targets [L, B, S, E] broadcast over the label
    per_layer = jnp.broadcast_to(target, (3, 2, 5, 4))
    out = losses.mix_domain_target(per_layer, domain, 0.5)
    assert out.shape == (3, 2, 5, 4)
    np.testing.assert_allclose(out[2], losses.mix_domain_target(target, domain, 0.5), rtol=1e-6)


def test_project_config_uses_the_label_target_library_default_is_the_papers():
    assert train_config.TrainConfig().domain_target == 0.0  # the paper's Eq. 4 target
    c = smollm2_135m.get_config()
    assert train_config.resolve(c).domain_target == 1.0  # measured: logbook/training-recipe.md §7d
    c.train.domain_target = 0.5
    assert train_config.resolve(c).domain_target == 0.5
    c.train.domain_target = 1.5
    with pytest.raises(train_config.TrainConfigError, match="domain_target"):
        train_config.resolve(c)


def test_the_router_phase_trains_against_the_label(tmp_path):
    """Same batch, same initial router (near uniform over E = 4 experts): with weight 1 the
    first step's loss is the label's cross-entropy, ~ln 4, while the sharpened coverage target
    of weight 0 gives a loss far from it; weight 0.5 lies in between."""
    c, tok, teacher = build(tmp_path / "tiny")
    E = len(models.load_readme(Path(c.run_dir) / "moe_init").spec.domains)
    base = first_router_loss(c, tok, teacher, tmp_path / "w0", domain_target=0.0)
    label = first_router_loss(c, tok, teacher, tmp_path / "w1", domain_target=1.0)
    half = first_router_loss(c, tok, teacher, tmp_path / "w05", domain_target=0.5)
    assert abs(label - np.log(E)) < 0.05
    assert abs(base - label) > 0.5
    assert min(base, label) < half < max(base, label)


def test_clustered_experts_refuse_the_label_target(tmp_path):
    c, tok, teacher = build(tmp_path / "tiny")
    moe_dir = Path(c.run_dir) / "moe_init"
    m = models.load_readme(moe_dir)
    names = [f"cluster{j}" for j in range(len(m.spec.domains))]  # as refactor/cluster.py names them
    recipe = {"domains": c.data.domains, "clusters": len(names)}
    spec = dataclasses.replace(m.spec, domains=names)
    models.save_readme(moe_dir, m.params, m.rc, spec, {"recipe": recipe})
    # clustered experts (named cluster0..) train on the domains their recipe names
    c.train.domain_target = 0.0
    ctx = context.build_context(c, Path(c.run_dir), train_config.resolve(c), tok, teacher)
    assert ctx.domains == list(parse_domains(c.data.domains))
    c.train.domain_target = 0.5
    with pytest.raises(context.TrainingError, match="clusters"):
        context.build_context(c, Path(c.run_dir), train_config.resolve(c), tok, teacher)


def test_domains_without_an_expert_keep_the_coverage_target():
    """data.extra_domains: tokens whose domain index is >= E keep the Eq. 4 target at any
    weight; labelled tokens get the mix."""
    t = jax.nn.softmax(jax.random.normal(jax.random.key(1), (2, 3, 4)), -1)
    d = jnp.array([[0, 4, 5], [3, 4, 1]])  # E = 4: domains 4 and 5 have no expert
    out = np.asarray(losses.mix_domain_target(t, d, 0.75))
    t = np.asarray(t)
    extra = np.asarray(d) >= 4
    np.testing.assert_allclose(out[extra], t[extra], rtol=1e-6)
    oh = np.eye(4)[np.asarray(d)[~extra]]
    np.testing.assert_allclose(out[~extra], 0.25 * t[~extra] + 0.75 * oh, rtol=1e-6)


def test_extra_domains_parse_after_the_experts():
    c = smollm2_135m.get_config()
    c.data.domains = "fiction,drama"
    c.data.extra_domains = "chat, mine=/data/x.jsonl"
    assert context.parse_extra(c) == {"chat": None, "mine": "/data/x.jsonl"}
    assert context.parse_weights("chat=2", ["fiction", "chat"]) == {"fiction": 1.0, "chat": 2.0}
    assert context.parse_weights("", ["fiction"]) is None
    with pytest.raises(context.TrainingError, match="not one of the domains"):
        context.parse_weights("code=1", ["fiction"])
