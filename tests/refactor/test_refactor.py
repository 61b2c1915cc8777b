"""Activation statistics, expert construction and the clustering option on a tiny model."""

import jax
import jax.numpy as jnp
import numpy as np

from readme_jax.model import llama
from readme_jax.model.config import LlamaConfig
from readme_jax.model.spec import ExpertSpec
from readme_jax.refactor import cluster, experts, stats

CFG = LlamaConfig(vocab_size=64, dim=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=24)


def _params():
    return llama.init_params(CFG, jax.random.key(0))


def test_stats_equal_mean_abs_activation_by_hand():
    p = _params()
    toks = np.array(jax.random.randint(jax.random.key(1), (2, 6), 0, 64))
    toks[1, 4:] = -1  # padding is excluded
    mean, n = stats.domain_stats(p, CFG, [toks])
    assert n == 10
    act = np.asarray(stats.token_activations(p, jnp.asarray(np.maximum(toks, 0)), CFG))  # [L,B,S,F]
    want = act[:, toks >= 0].mean(1)
    np.testing.assert_allclose(mean, want, rtol=1e-5, atol=1e-7)


def test_top_channel_masks_keep_remain_rate():
    s = np.random.default_rng(0).random((3, 2, 24))
    m = experts.top_channel_masks(s, 0.75)
    assert (m.sum(-1) == 18).all()
    assert m[0, 0, np.argmax(s[0, 0])] and not m[0, 0, np.argmin(s[0, 0])]


def test_expert_spec_round_trips(tmp_path):
    s = np.random.default_rng(0).random((3, 2, 24))
    spec = experts.build_expert_spec(s, 0.5, ["a", "b", "c"])
    spec.save(tmp_path)
    back = ExpertSpec.load(tmp_path)
    np.testing.assert_array_equal(back.expert_idx_LxExFe, spec.expert_idx_LxExFe)
    assert back.domains == ["a", "b", "c"] and back.remain_rate == 0.5


def test_identical_domains_give_all_shared_and_empty_experts():
    s = np.random.default_rng(0).random((1, 2, 24)).repeat(3, 0)
    spec = experts.build_expert_spec(s, 0.5, ["a", "b", "c"])
    assert (spec.shared_widths == 12).all() and (spec.expert_widths == 0).all()


def test_static_pruned_keeps_top_averaged_channels():
    p = _params()
    s = np.random.default_rng(0).random((3, 2, 24))
    pruned, width = experts.static_pruned_params(p, s, 0.5)
    assert width == 12 and pruned["layers"]["w_down"].shape == (2, 12, 16)


def test_kmeans_separates_obvious_clusters():
    rng = np.random.default_rng(0)
    a = rng.normal([5, 0, 0], 0.1, (50, 3))
    b = rng.normal([0, 5, 0], 0.1, (50, 3))
    x = np.concatenate([a, b])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    c = cluster.kmeans(x, 2)
    lab = np.argmax(x @ c.T, 1)
    assert len(set(lab[:50])) == 1 and len(set(lab[50:])) == 1 and lab[0] != lab[50]


def test_cluster_stats_build_experts_without_domain_labels():
    p = _params()
    batches = [np.asarray(jax.random.randint(jax.random.key(i), (2, 16), 0, 64)) for i in range(3)]
    st = cluster.cluster_stats(p, CFG, batches, 3, {"test": True})
    assert st.mean_abs_ExLxF.shape == (3, 2, 24) and sum(st.n_tokens) == 96
    assert st.domains == ["cluster0", "cluster1", "cluster2"]
    spec = experts.build_expert_spec(st.mean_abs_ExLxF, 0.5, st.domains)
    assert spec.num_experts == 3
