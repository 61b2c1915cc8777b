"""Reconstruction at refactoring time: the closed-form refit on tiny layers/models."""

import jax
import numpy as np
import pytest

from readme_jax.model import llama
from readme_jax.model.config import LlamaConfig, RouterConfig
from readme_jax.refactor import experts, layerwise, reconstruct, stats
from readme_jax.train import losses

CFG = LlamaConfig(vocab_size=64, dim=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=24)


def _layer(seed=0, F=12, D=5, T=(40, 30)):
    rng = np.random.default_rng(seed)
    hs = [rng.normal(size=(t, F)) for t in T]
    w = rng.normal(size=(F, D))
    parts = [np.array([0, 3, 5]), np.array([1, 2, 7]), np.array([2, 4, 8, 9])]  # shared, e0, e1
    uses = [[0, 1], [0, 2]]
    return hs, w, parts, uses


def _design(hs, parts, uses):
    """The least-squares design matrix: group g's rows see only its parts' columns."""
    n = sum(len(p) for p in parts)
    offs = np.cumsum([0] + [len(p) for p in parts])
    rows = []
    for h, used in zip(hs, uses, strict=True):
        z = np.zeros((len(h), n))
        for i in used:
            z[:, offs[i] : offs[i + 1]] = h[:, parts[i]]
        rows.append(z)
    return np.concatenate(rows)


def test_refit_is_the_lstsq_optimum():
    hs, w, parts, uses = _layer()
    got = reconstruct.ridge_refit([h.T @ h for h in hs], w, parts, uses, ridge=0.0)
    Z = _design(hs, parts, uses)
    Y = np.concatenate([h @ w for h in hs])
    want = np.linalg.lstsq(Z, Y, rcond=None)[0]
    np.testing.assert_allclose(np.concatenate(got), want, rtol=1e-4, atol=1e-5)
    # the error it reports is the lstsq residual, below plain channel dropping's
    grams = [h.T @ h for h in hs]
    err = reconstruct.layer_output_error(grams, w, parts, uses, got)
    np.testing.assert_allclose(err, np.sum((Z @ want - Y) ** 2) / np.sum(Y**2), rtol=1e-4)
    assert err < reconstruct.layer_output_error(grams, w, parts, uses, [w[p] for p in parts])


def test_ridge_pulls_toward_the_original_rows():
    hs, w, parts, uses = _layer(1)
    grams = [h.T @ h for h in hs]
    ridge = 0.3
    got = np.concatenate(reconstruct.ridge_refit(grams, w, parts, uses, ridge))
    Z = _design(hs, parts, uses)
    Y = np.concatenate([h @ w for h in hs])
    w0 = np.concatenate([w[p] for p in parts])
    lam = ridge * np.trace(Z.T @ Z) / Z.shape[1]
    Za = np.concatenate([Z, np.sqrt(lam) * np.eye(Z.shape[1])])
    Ya = np.concatenate([Y, np.sqrt(lam) * w0])
    np.testing.assert_allclose(got, np.linalg.lstsq(Za, Ya, rcond=None)[0], rtol=1e-4, atol=1e-5)


def test_every_channel_kept_returns_the_original_weights():
    hs, w, _, _ = _layer(2)
    grams = [h.T @ h for h in hs]
    (got,) = reconstruct.ridge_refit(grams, w, [np.arange(12)], [[0], [0]], ridge=1e-2)
    np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-5)


def test_mismatched_groups_raise():
    hs, w, parts, uses = _layer()
    with pytest.raises(ValueError, match="Gram matrices"):
        reconstruct.ridge_refit([hs[0].T @ hs[0]], w, parts, uses, 0.1)


def _batches(seed, n=2):
    toks = np.array(jax.random.randint(jax.random.key(seed), (n, 8), 0, 64))
    toks[-1, 6:] = -1
    return [toks]


def test_static_refit_with_every_channel_kept_is_the_dense_model():
    p = llama.init_params(CFG, jax.random.key(0))
    kept = np.tile(np.arange(CFG.ffn_dim), (CFG.n_layers, 1))
    w = reconstruct.reconstruct_static(p, CFG, kept, {"a": _batches(1), "b": _batches(2)}, 1e-2)
    np.testing.assert_allclose(w, np.asarray(p["layers"]["w_down"]), rtol=1e-4, atol=1e-6)


def _gram0(p, lp, batches, groups=None, g=None):
    """First-layer Gram matrix of the tokens of `batches` (in group g of `groups`, if given)."""
    G = 0
    for i, b in enumerate(batches):
        t, gid = reconstruct._grouped(b, np.zeros_like(b) if groups is None else groups[i])
        act = reconstruct._layer_features(lp, p["embed"][t], CFG)[1]
        G = G + np.asarray(reconstruct._masked_gram(act, gid == (0 if g is None else g)))
    return G


def test_readme_refit_lowers_the_layer_error_on_calibration_tokens():
    p = llama.init_params(CFG, jax.random.key(0))
    batches = {"a": _batches(1, 4), "b": _batches(2, 4)}
    spec, fit = _refit_moe(p, ["a", "b"], batches, 1e-3)
    # first layer: its inputs are the dense model's, so the errors compare directly
    lp = llama.unstack_layers(p)["layers"][0]
    grams = [_gram0(p, lp, batches[d]) for d in spec.domains]
    parts, uses = reconstruct.readme_parts(spec)(0)
    w = np.asarray(lp["w_down"])
    new = [np.asarray(fit["layers"]["shared_down"][0, : len(parts[0])])] + [
        np.asarray(fit["layers"]["expert_down"][0, e, : len(parts[1 + e])]) for e in range(2)
    ]
    err = reconstruct.layer_output_error(grams, w, parts, uses, new)
    drop = reconstruct.layer_output_error(grams, w, parts, uses, [w[q] for q in parts])
    assert err < drop
    # padded rows stay zero
    assert np.all(np.asarray(fit["layers"]["expert_down"])[0, 0, len(parts[1]) :] == 0)


def test_config_rejects_unknown_mode():
    with pytest.raises(ValueError, match="reconstruct"):
        reconstruct.ReconstructConfig(mode="magic")


def test_static_refit_is_applied_and_a_missing_one_is_refused_when_read_me_was_refit(tmp_path):
    """A run directory refactored before the static control: the static baseline trains with the
    refit rows it saved; when the Read-ME experts were refit but those rows are missing (the
    refactor ran without a static baseline configured), it refuses instead of silently
    comparing against an unrefit baseline."""
    L, K, D = 2, 3, 4
    params = {"layers": {"w_down": np.zeros((L, K, D), np.float32)}}
    assert reconstruct.apply_static_refit(tmp_path, params) is params  # reconstruction off
    with pytest.raises(FileNotFoundError, match="Rerun the refactor stage"):
        reconstruct.apply_static_refit(tmp_path, params, required=True)
    rows = np.arange(L * K * D, dtype=np.float32).reshape(L, K, D)
    np.savez(tmp_path / reconstruct.STATIC_REFIT_FILE, kept=np.zeros((L, K), np.int32), w_down=rows)
    got = reconstruct.apply_static_refit(tmp_path, params, required=True)
    np.testing.assert_array_equal(np.asarray(got["layers"]["w_down"]), rows)
    with pytest.raises(ValueError, match="static width"):
        reconstruct.apply_static_refit(tmp_path, {"layers": {"w_down": np.zeros((L, K + 1, D))}})


def _scores(names):
    return np.random.default_rng(0).random((len(names), CFG.n_layers, CFG.ffn_dim))


def _spec_and_moe(p, names):
    spec = experts.build_expert_spec(_scores(names), 0.5, names)
    return spec, experts.build_moe_params(llama.stack_layers(p), spec)


def _refit_moe(p, names, batches, ridge):
    """(spec, refit backbone) of the refactor stage with experts from random scores."""
    st = stats.ActivationStats(names, _scores(names), [1] * len(names), {})
    refit = reconstruct.ReconstructConfig(ridge=ridge)
    params, spec = layerwise.refactor_per_layer(p, CFG, st, 0.5, RouterConfig(), refit, batches)
    return spec, params["backbone"]


def test_per_token_groups_in_one_batch_equal_one_batch_per_group():
    p = llama.init_params(CFG, jax.random.key(0))
    spec, _ = _spec_and_moe(p, ["a", "b"])
    a, b = _batches(1, 3), _batches(2, 3)
    fn = reconstruct.readme_parts(spec)
    batches, groups = reconstruct.domain_groups([a, b])
    want = reconstruct.sequential_refit(p, CFG, batches, groups, fn, 1e-3)
    # one batch holding both groups' rows: each token on its own group's parts
    mixed = [np.concatenate([a[0], b[0]])]
    got = reconstruct.sequential_refit(p, CFG, mixed, [np.concatenate(groups)], fn, 1e-3)
    for rw, rg in zip(want, got, strict=True):
        for x, y in zip(rw, rg, strict=True):
            np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="token_groups"):
        reconstruct.sequential_refit(p, CFG, batches, groups[:1], fn, 1e-3)


def _abs_act_aux(lp, x, layer):
    gu = jax.numpy.einsum("bsd,dgf->bsgf", x, lp["w_gate_up"])
    h = jax.nn.silu(gu[:, :, 0]) * gu[:, :, 1]
    return h @ lp["w_down"], jax.numpy.abs(h)


def test_target_expert_groups_are_the_argmax_of_the_eq4_target():
    p = llama.init_params(CFG, jax.random.key(0))
    spec, _ = _spec_and_moe(p, ["cluster0", "cluster1", "cluster2"])
    (toks,) = _batches(3, 4)
    (got,) = reconstruct.target_expert_groups(p, CFG, spec, [toks])
    act = llama.forward(
        llama.unstack_layers(p), np.maximum(toks, 0), CFG, ffn=_abs_act_aux, return_hidden=True
    )[2]
    shared, ex = experts.expert_channel_masks(spec, CFG.ffn_dim)
    want = np.argmax(losses.routing_targets(act, losses.union_masks(shared, ex)), axis=-1)
    np.testing.assert_array_equal(got, np.where(toks >= 0, want, -1))
    assert set(np.unique(got[toks >= 0])) <= {0, 1, 2}


def test_clustered_experts_refit_each_token_on_its_target_expert():
    """Experts without domain labels: the first layer's rows solve the joint least squares over
    per-token groups (each token's routing-target expert), and beat plain channel dropping."""
    p = llama.init_params(CFG, jax.random.key(0))
    batches = {"a": _batches(1, 4), "b": _batches(2, 4)}
    spec, fit = _refit_moe(p, ["cluster0", "cluster1"], batches, 1e-3)
    pooled = batches["a"] + batches["b"]
    groups = reconstruct.target_expert_groups(p, CFG, spec, pooled)
    assert len(np.unique(np.concatenate([g.ravel() for g in groups]))) == 3  # -1, 0 and 1
    lp = llama.unstack_layers(p)["layers"][0]
    grams = [_gram0(p, lp, pooled, groups, g) for g in range(2)]
    parts, uses = reconstruct.readme_parts(spec)(0)
    w = np.asarray(lp["w_down"])
    want = reconstruct.ridge_refit(grams, w, parts, uses, 1e-3)
    got = [np.asarray(fit["layers"]["shared_down"][0, : len(parts[0])])] + [
        np.asarray(fit["layers"]["expert_down"][0, e, : len(parts[1 + e])]) for e in range(2)
    ]
    for x, y in zip(want, got, strict=True):
        np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-6)
    drop = reconstruct.layer_output_error(grams, w, parts, uses, [w[q] for q in parts])
    assert reconstruct.layer_output_error(grams, w, parts, uses, got) < drop
    with pytest.raises(ValueError, match="calibration domains"):
        _refit_moe(p, ["x", "y"], batches, 1e-3)
