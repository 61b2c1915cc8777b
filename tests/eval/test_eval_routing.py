"""Routing analysis: usage by domain, temporal locality, layer transitions, mutual information."""

from __future__ import annotations

import math

import numpy as np
import pytest

from readme_jax.eval.routing import (
    expert_usage,
    joint_counts,
    layer_redundancy,
    mutual_information,
    normalized_mutual_information,
    pairwise_mutual_information,
    temporal_locality,
)

E = 7


def test_mutual_information_is_zero_for_an_independent_joint():
    pa = np.array([0.1, 0.2, 0.3, 0.15, 0.05, 0.1, 0.1])
    pb = np.array([0.3, 0.1, 0.1, 0.1, 0.2, 0.1, 0.1])
    joint = np.outer(pa, pb) * 7000  # counts of an exactly independent pair
    assert mutual_information(joint) == pytest.approx(0.0, abs=1e-12)
    assert normalized_mutual_information(joint) == pytest.approx(0.0, abs=1e-12)


def test_mutual_information_is_log_e_for_identical_uniform_choices():
    a = np.repeat(np.arange(E), 1000)
    assert mutual_information(joint_counts(a, a, E)) == pytest.approx(math.log(E), rel=1e-12)
    perm = np.random.default_rng(0).permutation(E)  # a relabelling carries the same information
    assert mutual_information(joint_counts(a, perm[a], E)) == pytest.approx(math.log(E))
    assert normalized_mutual_information(joint_counts(a, perm[a], E)) == pytest.approx(1.0)


def test_layer_redundancy_of_sampled_choices():
    rng = np.random.default_rng(0)
    T = 200_000
    l0 = rng.integers(0, E, T)
    noisy = np.where(rng.random(T) < 0.5, l0, rng.integers(0, E, T))
    choices_LxT = np.stack([l0, l0, rng.integers(0, E, T), noisy[::-1]])
    r = layer_redundancy(choices_LxT, E)
    assert r.transitions_PxExE.shape == (3, E, E)
    assert r.transitions_PxExE.sum(axis=(1, 2)).tolist() == [T] * 3
    assert r.mi_P[0] == pytest.approx(math.log(E), rel=1e-3)  # identical layers
    assert r.mi_P[1] < 1e-3 and r.mi_P[2] < 1e-3  # independent layers
    assert r.nmi_P[0] == pytest.approx(1.0, rel=1e-3)
    np.testing.assert_allclose(r.transition_probs_PxExE[0], np.eye(E))
    np.testing.assert_allclose(r.transition_probs_PxExE.sum(-1), 1.0)
    d = r.to_dict()
    assert d["log_n_experts"] == pytest.approx(math.log(E)) and len(d["mutual_information"]) == 3


def test_partial_copy_has_intermediate_mutual_information():
    rng = np.random.default_rng(1)
    T = 200_000
    a = rng.integers(0, E, T)
    b = np.where(rng.random(T) < 0.5, a, rng.integers(0, E, T))
    mi = pairwise_mutual_information(np.stack([a, b]), E)
    assert 0.1 < mi[0, 1] < math.log(E) - 0.1
    assert mi[0, 0] == pytest.approx(math.log(E), rel=1e-3) and mi[0, 1] == mi[1, 0]


def test_temporal_locality_of_a_hand_made_sequence():
    r = temporal_locality(np.array([0, 0, 1, 1, 1, 2, 0, 0]))
    # pairs: (0,0) (0,1) (1,1) (1,1) (1,2) (2,0) (0,0) -> 4 kept of 7; runs 2, 3, 1, 2
    assert (r.n_kept, r.n_pairs, r.n_tokens) == (4, 7, 8)
    assert r.keep_fraction == pytest.approx(4 / 7)
    assert r.run_lengths.tolist() == [0, 1, 2, 1]
    assert r.mean_run_length == pytest.approx(2.0)


def test_temporal_locality_never_crosses_sequences_and_trims_padding():
    rows_BxS = np.array([[3, 3, 3, 9, 9], [3, 3, 1, 1, 9]])
    r = temporal_locality(rows_BxS, lengths=[3, 4])  # [3,3,3] and [3,3,1,1]
    assert (r.n_kept, r.n_pairs) == (2 + 2, 2 + 3)
    assert r.run_lengths.tolist() == [0, 0, 2, 1]
    ragged = temporal_locality([np.array([5]), np.array([5, 5])])  # no run joins the two
    assert (ragged.n_kept, ragged.n_pairs) == (1, 1)
    assert ragged.run_lengths.tolist() == [0, 1, 1]


def test_expert_usage_by_domain():
    u = expert_usage({"books": np.array([0, 0, 1, 2]), "code": np.array([[2, 2], [2, 1]])}, 3)
    assert u.domains == ["books", "code"]
    assert u.counts_DxE.tolist() == [[2, 1, 1], [0, 1, 3]]
    np.testing.assert_allclose(u.fraction_DxE, [[0.5, 0.25, 0.25], [0, 0.25, 0.75]])
    assert u.to_dict()["counts"] == [[2, 1, 1], [0, 1, 3]]
    with pytest.raises(ValueError, match="outside"):
        expert_usage({"x": np.array([3])}, 3)
