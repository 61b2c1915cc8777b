"""Expert construction rules (refactor/construct.py) and the construction study's scoring
(eval/construction.py, eval/paired.py) on a tiny random model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from readme_jax.eval import construction, paired
from readme_jax.eval.perplexity import dense_logits_fn, perplexity
from readme_jax.model import llama, moe
from readme_jax.model.config import ConfigError, LlamaConfig, MoEConfig
from readme_jax.refactor import construct, experts, stats

CFG = LlamaConfig(vocab_size=64, dim=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=24)
F = CFG.ffn_dim


def _params():
    return llama.init_params(CFG, jax.random.key(0))


def _batches(n=3, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 64, (2, 8)) for _ in range(n)]


def _stats(E=3, seed=0):
    rng = np.random.default_rng(seed)
    return stats.GroupStats(
        rng.random((E, 2, F)), rng.random((E, 2, F)), rng.integers(5, 50, E).astype(float), 0.5
    )


@pytest.mark.parametrize("rule", ["overlap", "partition"])
@pytest.mark.parametrize("score", ["magnitude", "frequency"])
def test_core_experts_keep_exactly_k_channels_per_token(rule, score):
    st = _stats(E=3)
    c = construct.Construction(score, "core", rule, 0.5)
    spec = construct.build_spec(st, 0.5, ["a", "b", "c"], c)
    k = construct.kept_channels(0.5, F)
    assert (spec.shared_widths + spec.expert_widths.max(-1) == k).all()
    assert (spec.expert_widths == spec.expert_widths[:, :1]).all()  # balanced
    for l in range(2):
        sh = set(spec.shared_idx_LxFs[l][spec.shared_idx_LxFs[l] >= 0].tolist())
        ex = [set(x[x >= 0].tolist()) for x in spec.expert_idx_LxExFe[l]]
        assert all(not (sh & e) for e in ex)  # experts outside the core
        for e in range(3):  # each expert's mask = its shared + private channels
            assert set(np.flatnonzero(spec.domain_masks_ExLxF[e, l])) == sh | ex[e]
        if rule == "partition":
            assert sum(len(e) for e in ex) == len(set().union(*ex))  # disjoint


def test_the_static_control_and_the_core_share_the_selection():
    st = _stats(E=3)
    c = construct.Construction("frequency", "core", "overlap", 0.5)
    spec = construct.build_spec(st, 0.5, ["a", "b", "c"], c)
    fs = int(spec.shared_widths[0])
    ctrl = construct.static_channels(st, "frequency", fs)
    np.testing.assert_array_equal(np.sort(spec.shared_idx_LxFs, -1), ctrl)


@pytest.mark.parametrize(
    "c",
    [
        construct.Construction("magnitude", "intersection"),
        construct.Construction("frequency", "core", "overlap", 0.5),
        construct.Construction("frequency", "core", "partition", 0.3),
    ],
)
def test_every_channel_kept_gives_the_dense_ffn(c):
    p = _params()
    spec = construct.build_spec(_stats(E=3), 1.0, ["a", "b", "c"], c)
    bb = experts.build_moe_params(llama.stack_layers(p), spec)
    toks = jnp.asarray(_batches(1)[0], jnp.int32)
    e = jnp.asarray(np.random.default_rng(0).integers(0, 3, (*toks.shape, 1)), jnp.int32)
    got = moe.moe_forward(bb, toks, CFG, MoEConfig(3), (e, jnp.ones(e.shape)))[0]
    want = llama.forward(p, toks, CFG)[0]
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


def test_intersection_rule_is_the_papers():
    st = _stats(E=3)
    spec = construct.build_spec(st, 0.5, ["a", "b", "c"], construct.Construction())
    ref = experts.build_expert_spec(st.mean_abs_ExLxF, 0.5, ["a", "b", "c"])
    np.testing.assert_array_equal(spec.expert_idx_LxExFe, ref.expert_idx_LxExFe)


def test_bad_constructions_are_refused():
    with pytest.raises(ConfigError, match="refactor.score"):
        construct.Construction("often").check()
    with pytest.raises(ConfigError, match="partition"):
        construct.Construction("magnitude", "intersection", "partition").check()
    with pytest.raises(ValueError, match="expected"):
        construction.parse_construction("frequency/half")
    c = construction.parse_construction("frequency/core0.25/partition")
    assert (c.shared_frac, c.experts) == (0.25, "partition")


def test_group_stats_match_mean_abs_and_count_each_tokens_top_channels():
    p = _params()
    bs = _batches(2)
    bs[1][1, 5:] = -1  # padding is excluded
    groups = [np.zeros((2, 8), int), np.ones((2, 8), int)]
    gs = stats.group_stats(p, CFG, bs, groups, 2, 0.5)
    assert gs.n_tokens.tolist() == [16, 13]
    mean1, n1 = stats.domain_stats(p, CFG, [bs[1]])
    assert n1 == 13
    np.testing.assert_allclose(gs.mean_abs_ExLxF[1], mean1, rtol=1e-5, atol=1e-7)
    # every token has exactly F/2 channels in its top half (random floats: no ties)
    np.testing.assert_allclose(gs.rate_ExLxF.sum(-1), F // 2, rtol=1e-6)
    assert gs.rate_ExLxF.min() >= 0 and gs.rate_ExLxF.max() <= 1


def test_obs_score_is_the_error_left_once_the_other_rows_are_refit():
    # the ridge refit of every row but j (refactor/reconstruct.py's objective), solved directly:
    # the error it leaves is the OBS score, channel by channel
    rng = np.random.default_rng(0)
    T, Fh, D, ridge = 40, 6, 3, 0.05
    h = rng.normal(size=(T, Fh)) * rng.uniform(0.2, 2.0, Fh)
    h[:, 5] = h[:, 4] + 0.01 * rng.normal(size=T)  # a near-copy: cheap to drop either
    w = rng.normal(size=(Fh, D))
    got = stats.obs_scores(h.T @ h, T, w, ridge)
    A = h.T @ h / T
    lam = ridge * np.diagonal(A).mean()
    for j in range(Fh):
        r = [i for i in range(Fh) if i != j]
        # min over rows W'_r of ||h_r W'_r - h w||^2 / T + lam ||W'_r - w_r||^2, W'_j = 0
        wr = np.linalg.solve(A[np.ix_(r, r)] + lam * np.eye(Fh - 1), A[r] @ w + lam * w[r])
        err = np.sum((h[:, r] @ wr - h @ w) ** 2) / T + lam * (
            np.sum((wr - w[r]) ** 2) + w[j] @ w[j]
        )
        np.testing.assert_allclose(got[j], err, rtol=1e-8)
    # the near-copies score far below what their size alone says
    energy = np.diagonal(A) * np.sum(w**2, 1)
    assert got[4] < 0.2 * energy[4] and got[5] < 0.2 * energy[5]
    with pytest.raises(ValueError, match="ridge > 0"):
        stats.obs_scores(h.T @ h, T, w, 0.0)


def test_group_stats_obs_per_group_and_pooled_from_the_grams():
    p = _params()
    bs = _batches(2)
    bs[1][1, 5:] = -1
    groups = [np.zeros((2, 8), int), np.ones((2, 8), int)]
    gs = stats.group_stats(p, CFG, bs, groups, 2, 0.5, obs_ridge=0.01)
    assert gs.obs_ExLxF.shape == (2, 2, F) and gs.obs_LxF.shape == (2, F)
    # h of every token and layer, from the forward with the FFN's activations returned
    h_per = []
    for b in bs:
        toks = jnp.asarray(np.maximum(b, 0), jnp.int32)
        gu_h = llama.forward(p, toks, CFG, ffn=_ffn_with_h, return_hidden=True)[2]
        h_per.append(np.asarray(gu_h, np.float64))  # [L, B, S, F]
    for l in range(2):
        w = np.asarray(p["layers"]["w_down"][l], np.float64)
        rows = [h_per[i][l][bs[i] >= 0] for i in range(2)]
        for e in range(2):
            want = stats.obs_scores(rows[e].T @ rows[e], len(rows[e]), w, 0.01)
            np.testing.assert_allclose(gs.obs_ExLxF[e, l], want, rtol=2e-4)
        allr = np.concatenate(rows)
        want = stats.obs_scores(allr.T @ allr, len(allr), w, 0.01)
        np.testing.assert_allclose(gs.obs_LxF[l], want, rtol=2e-4)
        np.testing.assert_allclose(gs.pooled("obs")[l], want, rtol=2e-4)
    # a construction and its static control both read it; without it they refuse
    spec = construct.build_spec(gs, 0.5, ["a", "b"], construct.Construction("obs", "core"))
    fs = int(spec.shared_widths[0])
    np.testing.assert_array_equal(
        np.sort(spec.shared_idx_LxFs, -1), construct.static_channels(gs, "obs", fs)
    )
    with pytest.raises(ValueError, match="no OBS score"):
        construct.static_channels(_stats(), "obs", 4)


def _ffn_with_h(lp, x, layer):
    gu = jnp.einsum("bsd,dgf->bsgf", x, lp["w_gate_up"])
    h = jax.nn.silu(gu[:, :, 0]) * gu[:, :, 1]
    return h @ lp["w_down"], h


def test_window_nll_averages_to_the_perplexity():
    p = llama.unstack_layers(_params())
    toks = np.random.default_rng(3).integers(0, 64, 64)
    w = construction.window_nll(dense_logits_fn(CFG), p, toks, 16, batch_size=4)
    assert w.shape == (4,)
    r = perplexity(dense_logits_fn(CFG), p, toks, max_length=16, batch_size=4, progress=False)
    np.testing.assert_allclose(np.exp(w.mean()), r.ppl, rtol=1e-5)


def test_paired_bootstrap():
    d = np.random.default_rng(0).normal(0, 1, 40)
    m, lo, hi = paired.paired_bootstrap(d - d)  # a model against itself
    assert m == lo == hi == 0.0
    m, lo, hi = paired.paired_bootstrap(d * 0.01 + 0.5)  # clearly worse: interval above 0
    assert 0 < lo < m < hi
    assert paired.paired_bootstrap(d, seed=3) == paired.paired_bootstrap(d, seed=3)
    with pytest.raises(ValueError, match="no windows"):
        paired.paired_bootstrap(np.array([]))
    with pytest.raises(ValueError, match="non-finite"):
        paired.paired_bootstrap(np.array([1.0, np.nan]))


def _result(models):
    cfg = {"window": 16, "seed": 0, "remain_rate": 0.5}
    return {
        "config": cfg,
        "domains": ["a"],
        "tokens_per_domain": {"a": 64},
        "minutes": 1.0,
        "models": models,
    }


def test_studies_run_in_parts_merge_with_paired_intervals():
    dense = {"kind": "dense", "ppl": 2.0, "ppl_per_domain": {"a": 2.0}, "window_nll": [0.7] * 4}
    static = {**dense, "kind": "static", "window_nll": [1.0, 1.1, 0.9, 1.0]}
    better = {**dense, "kind": "readme", "control": "static", "window_nll": [0.9, 1.0, 0.8, 0.9]}
    res = construction.merge(
        [_result({"dense": dense, "static": static}), _result({"dense": dense, "ours": better})]
    )
    assert set(res["models"]) == {"dense", "static", "ours"} and res["minutes"] == 2.0
    vs = res["models"]["ours"]["vs_control"]
    np.testing.assert_allclose(vs["ppl_ratio"], np.exp(-0.1))
    np.testing.assert_allclose(vs["ci95"], np.exp([-0.1, -0.1]))
    assert "| ours |" in construction.render(res)
    other = {**dense, "window_nll": [0.6] * 4}
    with pytest.raises(ValueError, match="different held-out windows"):
        construction.merge([_result({"dense": dense}), _result({"dense": other})])


def test_context_chunks_share_one_cluster_and_padding_none():
    from readme_jax.refactor.cluster import chunk_assign

    bs = _batches(3)
    bs[2][1, 6:] = -1
    groups = chunk_assign(_params(), CFG, bs, 2, chunk=4)
    for t, g in zip(bs, groups, strict=True):
        assert g.shape == t.shape and ((g == -1) == (t < 0)).all()
        for r in range(t.shape[0]):
            for s0 in (0, 4):
                vals = set(g[r, s0 : s0 + 4][t[r, s0 : s0 + 4] >= 0].tolist())
                assert len(vals) <= 1  # one cluster per chunk
    assert set(np.concatenate([g.ravel() for g in groups]).tolist()) == {-1, 0, 1}


def test_prefix_counts_sum_over_each_documents_prefix():
    from readme_jax.train.losses import prefix_counts

    counts = jnp.asarray(np.random.default_rng(0).random((2, 6, 3)), jnp.float32)
    seg = jnp.asarray([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]])
    got = np.asarray(prefix_counts(counts, seg))
    c = np.asarray(counts)
    want = np.stack(
        [
            np.concatenate([np.cumsum(c[0, :3], 0), np.cumsum(c[0, 3:5], 0), c[0, 5:]]),
            np.cumsum(c[1], 0),
        ]
    )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_router_grouping_follows_the_router_and_scores_its_model(tmp_path):
    """The study's "router" grouping: every calibration token grouped by the trained router's
    top-1 expert (padding -1), and the router's own model scored with the router's routing
    (equal to readme_forward's NLL on the same window)."""
    from readme_jax.checkpoints.models import save_readme
    from readme_jax.model.readme import readme_forward
    from readme_jax.refactor.cluster import router_assign
    from readme_jax.testing import tiny_readme

    m = tiny_readme(num_experts=3, vocab=64)
    cfg = m.rc.model
    save_readme(tmp_path / "moe", m.params, m.rc, m.spec, m.meta)
    bs = [np.random.default_rng(s).integers(0, 64, (2, 16)) for s in range(4)]
    bs[3][1, 9:] = -1
    groups = router_assign(m.params["router"], m.rc.router, cfg, bs)
    # jitted: one program per shape (eager, every op compiles on its own)
    fwd = jax.jit(readme_forward, static_argnums=2)
    for t, g in zip(bs, groups, strict=True):
        want = np.argmax(
            np.asarray(fwd(m.params, jnp.asarray(np.maximum(t, 0)), m.rc)[1]["router_logits"]),
            -1,
        )
        np.testing.assert_array_equal(g, np.where(t >= 0, want, -1))
    dense = llama.init_params(cfg, jax.random.key(0))
    stream = np.random.default_rng(9).integers(0, 64, 33)
    c = construction.StudyConfig(
        groupings=("router",),
        refit=(True,),
        refit_sequences=4,
        window=16,
        router=str(tmp_path / "moe"),
    )
    res = construction.run_study(
        cfg, dense, {"a": bs[:2], "b": bs[2:]}, {"a": stream, "b": stream}, c, log=lambda s: None
    )
    row = res["models"][f"model {tmp_path / 'moe'}"]
    toks = jnp.asarray(stream[:16][None])
    logits = fwd(m.params, toks, m.rc)[0][0, :-1]
    nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, toks[0, 1:, None], -1)[:, 0]
    np.testing.assert_allclose(row["window_nll"][0], float(nll.mean()), rtol=1e-4)
    rebuilt = res["models"]["router magnitude/intersection +refit"]
    assert rebuilt["num_experts"] == 3 and "vs_control" in rebuilt
