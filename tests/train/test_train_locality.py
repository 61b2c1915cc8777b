"""The locality term of the router phase: penalises expert switches between consecutive tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_helpers import build, first_router_loss

from configs import smollm2_135m
from readme_jax.train import config as train_config
from readme_jax.train import losses

E = 8


def _one_hot_logits(experts, scale=30.0):
    """[1, S, E] logits whose softmax is (numerically) one-hot on `experts`."""
    return scale * jax.nn.one_hot(jnp.asarray([experts]), E)


@pytest.mark.parametrize("kind", ["tv", "overlap"])
def test_zero_for_a_constant_expert_sequence(kind):
    seg = jnp.ones((1, 16), jnp.int32)
    assert float(losses.switch_penalty(_one_hot_logits([3] * 16), seg, kind)) < 1e-6


def test_tv_is_zero_for_any_constant_distribution():
    logits = jnp.broadcast_to(jnp.linspace(-1.0, 2.0, E), (2, 16, E))
    assert float(losses.switch_penalty(logits, jnp.ones((2, 16), jnp.int32))) == 0.0


@pytest.mark.parametrize("kind", ["tv", "overlap"])
def test_grows_with_the_number_of_switches(kind):
    seg = jnp.ones((1, 17), jnp.int32)
    values = []
    for n_switch in range(0, 17, 4):  # the first n_switch pairs switch, the rest keep
        experts = [i % 2 for i in range(n_switch + 1)] + [n_switch % 2] * (16 - n_switch)
        values.append(float(losses.switch_penalty(_one_hot_logits(experts), seg, kind)))
    assert values[0] < 1e-6
    assert all(b > a for a, b in zip(values, values[1:], strict=False))
    np.testing.assert_allclose(values, [n / 16 for n in range(0, 17, 4)], atol=1e-5)


def test_document_boundaries_and_padding_are_masked():
    # expert changes exactly where the document changes, then padding with another expert
    logits = _one_hot_logits([0] * 6 + [5] * 6 + [2] * 4)
    seg = jnp.asarray([[1] * 6 + [2] * 6 + [0] * 4])
    assert float(losses.switch_penalty(logits, seg)) < 1e-6
    kept, pairs = losses.temporal_locality(jnp.argmax(logits, -1), seg)
    assert (float(kept), float(pairs)) == (10.0, 10.0)
    # the same switch inside one document is penalised
    assert float(losses.switch_penalty(logits, jnp.ones_like(seg))) > 0.1


def test_gradient_descent_on_the_term_makes_routing_more_local():
    key = jax.random.PRNGKey(0)
    logits = jax.random.normal(key, (2, 32, E))
    seg = jnp.ones((2, 32), jnp.int32)
    loc = lambda z: losses.temporal_locality(jnp.argmax(z, -1), seg)  # noqa: E731
    kept0, pairs = loc(logits)
    grad = jax.jit(jax.grad(lambda z: losses.switch_penalty(z, seg, "overlap")))
    for _ in range(100):
        logits = logits - 5.0 * grad(logits)
    kept1, _ = loc(logits)
    # random logits keep ~1/E of pairs; the term alone joins neighbours into runs
    assert float(kept0) / float(pairs) < 0.2 and float(kept1) > 2 * float(kept0)


def test_weight_comes_from_the_config_and_defaults_to_off():
    c = smollm2_135m.get_config()
    assert train_config.resolve(c).locality_weight == 0.0
    c.train.locality_weight = 0.3
    assert train_config.resolve(c).locality_weight == 0.3


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="kind"):
        losses.switch_penalty(jnp.zeros((1, 2, E)), jnp.ones((1, 2), jnp.int32), "cosine")


def test_the_router_phase_adds_the_weighted_term(tmp_path):
    """Same batch, same parameters: the first router step's loss grows with the weight by
    weight x the switch penalty (in (0, 1]) of the untrained router."""
    c, tok, teacher = build(tmp_path / "tiny")
    base = first_router_loss(c, tok, teacher, tmp_path / "w0", locality_weight=0.0)
    with_term = first_router_loss(c, tok, teacher, tmp_path / "w10", locality_weight=10.0)
    assert base < with_term <= base + 10.0
