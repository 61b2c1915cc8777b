"""The per-layer refactor (block Grams, Schur solve, MoE arrays filled per layer) against the
whole-model path it replaced (full [F, F] Grams, one joint solve, stacked copies; construction of
every layer, then a second pass rewriting their down rows), down to the recipe's refactor stage
(`pipeline.build_readme`) with each of its options."""

import dataclasses
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from memory_probe import peak_rss_during

from readme_jax.checkpoints import models
from readme_jax.model import llama
from readme_jax.model.config import LlamaConfig, RouterConfig
from readme_jax.model.router import init_layerwise_gates, init_router
from readme_jax.refactor import block_solve, construct, experts, layerwise, reconstruct, stats
from readme_jax.refactor.cluster import router_assign
from readme_jax.refactor.construct import Construction
from readme_jax.refactor.pipeline import Recipe, build_readme
from readme_jax.refactor.targets import top_channel_mask
from readme_jax.testing import random_checkpoint

CFG = LlamaConfig(vocab_size=64, dim=16, n_layers=3, n_heads=2, n_kv_heads=1, ffn_dim=40)
SMOL = LlamaConfig(vocab_size=256, dim=576, n_layers=2, n_heads=9, n_kv_heads=3, ffn_dim=1536)


def _whole_model_refit(dense, cfg, batches, token_groups, parts_fn, ridge):
    """The refit as it was: all layers unstacked, full Grams per group, the joint solve."""
    items = [reconstruct._grouped(t, g) for t, g in zip(batches, token_groups, strict=True)]
    p = llama.unstack_layers(dense)
    xs = [p["embed"][t] for t, _ in items]
    out = []
    for l in range(cfg.n_layers):
        lp = p["layers"][l]
        parts, uses = parts_fn(l)
        grams = np.zeros((len(uses), cfg.ffn_dim, cfg.ffn_dim))
        cache = []
        for i, (_, g_BxS) in enumerate(items):
            x1, act = reconstruct._layer_features(lp, xs[i], cfg)
            present = [int(g) for g in np.unique(g_BxS[g_BxS >= 0])]
            for g in present:
                m = jnp.asarray(g_BxS == g)
                grams[g] += np.asarray(reconstruct._masked_gram(act, m), np.float64)
            cache.append((x1, act, present))
        rows = reconstruct.ridge_refit(list(grams), np.asarray(lp["w_down"]), parts, uses, ridge)
        out.append(rows)
        for i, (x1, act, present) in enumerate(cache):
            y = x1
            for g in present:
                cols = np.concatenate([parts[j] for j in uses[g]])
                w = jnp.asarray(np.concatenate([rows[j] for j in uses[g]]))
                yg = act[..., cols] @ w
                if len(present) > 1:
                    yg = jnp.where(jnp.asarray(items[i][1] == g)[..., None], yg, 0)
                y = y + yg
            xs[i] = y
    return out


def _whole_model_moe(dense, spec):
    """build_moe_params as it was: per-layer gathers, stacked, then converted."""
    L = spec.shared_idx_LxFs.shape[0]
    wgu = np.asarray(dense["layers"]["w_gate_up"])
    wdn = np.asarray(dense["layers"]["w_down"])

    def take(l, idx):
        v = (idx >= 0).astype(wgu.dtype)
        s = np.maximum(idx, 0)
        return wgu[l][..., s] * v, wdn[l][s] * v[:, None]

    sh = [take(l, spec.shared_idx_LxFs[l]) for l in range(L)]
    ex = [
        [take(l, spec.expert_idx_LxExFe[l, e]) for e in range(spec.num_experts)] for l in range(L)
    ]
    return {
        "shared_gate_up": np.stack([g for g, _ in sh]),
        "shared_down": np.stack([d for _, d in sh]),
        "expert_gate_up": np.stack([np.stack([g for g, _ in r]) for r in ex]),
        "expert_down": np.stack([np.stack([d for _, d in r]) for r in ex]),
    }


def _whole_model_group_stats(dense, cfg, batches, groups, E, top_frac=0.5):
    """group_stats as it was: one jitted forward over the whole model per batch."""

    def ffn(lp, x, layer, onehot):
        gu = jnp.einsum("bsd,dgf->bsgf", x, lp["w_gate_up"])
        h = jax.nn.silu(gu[:, :, 0]) * gu[:, :, 1]
        a = jnp.abs(h).astype(jnp.float32)
        top = top_channel_mask(a, top_frac)
        return h @ lp["w_down"], (
            jnp.einsum("bsf,bse->ef", a, onehot),
            jnp.einsum("bsf,bse->ef", top, onehot),
        )

    @jax.jit
    def sums(p, toks, g):
        onehot = jax.nn.one_hot(g, E)
        f = lambda lp, x, layer: ffn(lp, x, layer, onehot)  # noqa: E731
        return llama.forward(p, toks, cfg, ffn=f, return_hidden=True)[2], onehot.sum((0, 1))

    s_abs = np.zeros((E, cfg.n_layers, cfg.ffn_dim))
    s_top = np.zeros_like(s_abs)
    n = np.zeros(E)
    for toks, g in zip(batches, groups, strict=True):
        g = np.where(toks >= 0, g, -1)
        (a, t), c = sums(dense, jnp.asarray(np.maximum(toks, 0)), jnp.asarray(g))
        s_abs += np.moveaxis(np.asarray(a, np.float64), 0, 1)
        s_top += np.moveaxis(np.asarray(t, np.float64), 0, 1)
        n += np.asarray(c)
    return s_abs / n[:, None, None], s_top / n[:, None, None], n


def _batches(seed, cfg, n=2, S=8):
    toks = np.array(jax.random.randint(jax.random.key(seed), (n, S), 0, cfg.vocab_size))
    toks[-1, S - 2 :] = -1
    return [toks]


def _random_layer(seed, F=30, D=6, E=3):
    rng = np.random.default_rng(seed)
    hs = [rng.normal(size=(50, F)) * rng.random(F) for _ in range(E)]
    w = rng.normal(size=(F, D))
    perm = rng.permutation(F)
    shared = np.sort(perm[:6])
    # private parts overlap each other (a channel in two domains' top sets but not all)
    private = [np.sort(rng.choice(perm[6:], 9, replace=False)) for _ in range(E)]
    return hs, w, [shared, *private], [[0, 1 + e] for e in range(E)]


def _blocks(hs, w, parts, uses):
    cols = [np.concatenate([parts[j] for j in u]) for u in uses]
    return (
        [h[:, c].T @ h[:, c] for h, c in zip(hs, cols, strict=True)],
        [h[:, c].T @ (h @ w) for h, c in zip(hs, cols, strict=True)],
    )


@pytest.mark.parametrize("ridge", [0.0, 1e-2, 0.5])
def test_block_solve_equals_the_joint_solve(ridge):
    hs, w, parts, uses = _random_layer(0)
    want = reconstruct.ridge_refit([h.T @ h for h in hs], w, parts, uses, ridge)
    got = block_solve.ridge_refit_blocks(*_blocks(hs, w, parts, uses), w, parts, uses, ridge)
    for x, y in zip(want, got, strict=True):
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6)


def test_block_solve_of_other_structures_assembles_the_joint_system():
    hs, w, parts, _ = _random_layer(1)
    uses = [[0, 1, 2], [0, 2], [3]]  # part 2 in two groups, part 0 not in every group
    want = reconstruct.ridge_refit([h.T @ h for h in hs], w, parts, uses, 1e-2)
    got = block_solve.ridge_refit_blocks(*_blocks(hs, w, parts, uses), w, parts, uses, 1e-2)
    for x, y in zip(want, got, strict=True):
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6)


def test_block_solve_with_no_shared_part_and_a_single_part():
    hs, w, parts, uses = _random_layer(2)
    parts = [parts[0][:0], *parts[1:]]
    for ps, us in [(parts, uses), ([parts[1]], [[0], [0], [0]])]:
        want = reconstruct.ridge_refit([h.T @ h for h in hs], w, ps, us, 1e-2)
        got = block_solve.ridge_refit_blocks(*_blocks(hs, w, ps, us), w, ps, us, 1e-2)
        for x, y in zip(want, got, strict=True):
            np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6)


def _refit_both(cfg, names, n_rows, layers_as_list=False, S=8):
    p = llama.init_params(cfg, jax.random.key(0))
    scores = np.random.default_rng(0).random((len(names), cfg.n_layers, cfg.ffn_dim))
    spec = experts.build_expert_spec(scores, 0.5, names)
    per_domain = [_batches(i + 1, cfg, n_rows, S) for i in range(len(names))]
    batches, groups = reconstruct.domain_groups(per_domain)
    fn = reconstruct.readme_parts(spec)
    want = _whole_model_refit(p, cfg, batches, groups, fn, 1e-2)
    src = llama.unstack_layers(p) if layers_as_list else p
    got = reconstruct.sequential_refit(src, cfg, batches, groups, fn, 1e-2)
    return want, got


@pytest.mark.parametrize("layers_as_list", [False, True])
def test_per_layer_refit_equals_the_whole_model_refit_on_the_tiny_config(
    layers_as_list, monkeypatch
):
    monkeypatch.setattr(reconstruct, "_F_CHUNK", 16)  # Gram rows in 3 chunks of F = 40
    want, got = _refit_both(CFG, ["a", "b", "c"], 3, layers_as_list)
    worst = max(
        float(np.max(np.abs(y - x)))
        for rw, rg in zip(want, got, strict=True)
        for x, y in zip(rw, rg, strict=True)
    )
    assert worst <= 1e-6, worst


def test_per_layer_refit_equals_the_whole_model_refit_at_smollm2_width():
    """Enough tokens per group (2,048) for a well-posed fit: with fewer tokens than channels the
    solve amplifies a 1-ulp difference in one layer's f32 rows to ~1e-5 in the next layer's."""
    want, got = _refit_both(SMOL, ["a", "b", "c", "d"], 4, S=512)
    for rw, rg in zip(want, got, strict=True):
        for x, y in zip(rw, rg, strict=True):
            np.testing.assert_allclose(y, x, rtol=0, atol=1e-6)


def test_moe_params_filled_per_layer_equal_the_stacked_gathers():
    p = llama.init_params(CFG, jax.random.key(1))
    scores = np.random.default_rng(1).random((3, CFG.n_layers, CFG.ffn_dim))
    spec = experts.build_expert_spec(scores, 0.4, ["a", "b", "c"])
    want = _whole_model_moe(p, spec)
    for src in (p, llama.unstack_layers(p)):
        got = experts.build_moe_params(src, spec)["layers"]
        for k, v in want.items():
            assert got[k].dtype == p["layers"]["w_down"].dtype
            np.testing.assert_array_equal(np.asarray(got[k]), v)


@pytest.mark.skipif(
    not os.environ.get("READMEJAX_PAPER_WIDTH"),
    reason="paper width (D 4096, F 11008): 1-4 min on 2 cores; set READMEJAX_PAPER_WIDTH=1",
)
@pytest.mark.slow
def test_paper_width_layer_refits_within_bounded_time_and_memory():
    """One Llama-2-7B-width layer, 4 domains x 512 tokens, experts as wide as on real text: the
    refit's extra memory stays near one layer's f32 weights, one group's [N, F] Gram rows and
    the groups' eliminated blocks (the joint solve of full Grams passed 14 GB at two layers)."""
    import time

    cfg = LlamaConfig(
        vocab_size=512, dim=4096, n_layers=1, n_heads=32, n_kv_heads=32, ffn_dim=11008
    ).replace(dtype="bfloat16")
    p = llama.init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    scores = rng.random((4, 1, cfg.ffn_dim)) + 3 * rng.random(cfg.ffn_dim)  # shared ~ F/4
    spec = experts.build_expert_spec(scores, 0.5, list("abcd"))
    batches, groups = reconstruct.domain_groups([_batches(i + 1, cfg, 2, 256) for i in range(4)])
    fn = reconstruct.readme_parts(spec)
    t0 = time.perf_counter()
    rows, grown = peak_rss_during(
        lambda: reconstruct.sequential_refit(p, cfg, batches, groups, fn, 1e-2)
    )
    wall = time.perf_counter() - t0
    assert all(np.isfinite(r).all() for r in rows[0])
    assert [len(r) for r in rows[0]] == [len(q) for q in fn(0)[0]]
    assert wall < 400, wall
    assert grown < 4.5e9, grown


@pytest.mark.parametrize("cfg", [CFG, SMOL], ids=["tiny", "smollm2_width"])
def test_per_layer_statistics_equal_the_whole_model_forward(cfg):
    p = llama.init_params(cfg, jax.random.key(2))
    per_domain = [_batches(i + 1, cfg, 2, 16) for i in range(3)]
    batches, groups = reconstruct.domain_groups(per_domain)
    want = _whole_model_group_stats(p, cfg, batches, groups, 3)
    for src in (p, llama.unstack_layers(p)):
        got = stats.group_stats(src, cfg, batches, groups, 3)
        np.testing.assert_allclose(got.mean_abs_ExLxF, want[0], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(got.rate_ExLxF, want[1], rtol=0, atol=1e-12)
        np.testing.assert_array_equal(got.n_tokens, want[2])


def _whole_model_build(
    dense, cfg, st, remain_rate, router_cfg, refit, domain_batches, seed=0, con=None, groups=None
):
    """The refactor stage as it was (pipeline.refactor, then reconstruct.at_refactor or, for
    context and router clusters, pipeline._refit_by_groups): every layer's MoE arrays built and
    stacked, then their down rows rewritten from the refit's returned rows."""
    con = con or Construction()
    if con == Construction():
        spec = experts.build_expert_spec(st.mean_abs_ExLxF, remain_rate, st.domains)
    else:
        spec = construct.build_spec(st.groups(), remain_rate, st.domains, con)
    k_router, k_gates = jax.random.split(jax.random.key(seed))
    gates = init_layerwise_gates(cfg, spec.num_experts, k_gates)
    backbone = experts.build_moe_params(dense, spec, gates_LxDxE=gates)
    router = init_router(router_cfg, cfg, spec.num_experts, k_router, dense["embed"])
    if refit.mode == "none":
        return {"backbone": backbone, "router": router}, spec
    n = refit.calib_sequences
    sub = {d: reconstruct.first_rows(bs, n) for d, bs in domain_batches.items()} if n else None
    sub = sub or domain_batches
    if groups is None and list(sub) == list(spec.domains):
        rows_in, tg = reconstruct.domain_groups([sub[d] for d in spec.domains])
    else:
        rows_in = [b for bs in sub.values() for b in bs]
        tg = (groups or (lambda s, r: reconstruct.target_expert_groups(dense, cfg, s, r)))(
            spec, rows_in
        )
    parts = reconstruct.readme_parts(spec)
    rows = reconstruct.sequential_refit(dense, cfg, rows_in, tg, parts, refit.ridge)
    return {"backbone": construct.refit_rows(backbone, spec, rows), "router": router}, spec


def _assert_same_params(want, got):
    w, g = jax.tree.leaves_with_path(want), jax.tree.leaves_with_path(got)
    assert [k for k, _ in w] == [k for k, _ in g]
    for (k, x), (_, y) in zip(w, g, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape, k
        np.testing.assert_array_equal(np.asarray(y), np.asarray(x), err_msg=str(k))


@pytest.mark.parametrize("mode", ["lstsq", "none"])
def test_one_pass_refactor_equals_construction_then_refit(mode, tmp_path):
    cfg = CFG
    p = llama.init_params(cfg, jax.random.key(3))
    names = ["a", "b", "c"]
    domain_batches = {d: _batches(i + 1, cfg, 3) for i, d in enumerate(names)}
    st = stats.collect_stats(p, cfg, domain_batches, {})
    rcfg, refit = RouterConfig(16, 2, 32), reconstruct.ReconstructConfig(mode)
    want, spec = _whole_model_build(p, cfg, st, 0.5, rcfg, refit, domain_batches, seed=4)
    for src, alloc in ((p, None), (llama.unstack_layers(p), layerwise.DiskArrays(tmp_path / "a"))):
        got, spec2 = layerwise.refactor_per_layer(
            src, cfg, st, 0.5, rcfg, refit, domain_batches, seed=4, alloc=alloc
        )
        assert spec2.shared_widths.tolist() == spec.shared_widths.tolist()
        _assert_same_params(want, got)


def test_layers_read_from_disk_equal_the_loaded_model(tmp_path):
    from readme_jax.checkpoints import hf, layers

    cfg = CFG.replace(tie_embeddings=False, dtype="bfloat16")
    p = llama.init_params(cfg, jax.random.key(5))
    hf.save_hf(tmp_path, cfg, p, max_shard_bytes=20_000)  # several shards
    cfg2, loaded = hf.load_hf(tmp_path, "bfloat16")
    cfg3, lazy = layers.open_hf(tmp_path, "bfloat16")
    assert cfg3 == cfg2 and isinstance(lazy["layers"], layers.HFLayers)
    for k in ("embed", "final_norm", "lm_head"):
        np.testing.assert_array_equal(np.asarray(lazy[k]), np.asarray(loaded[k]))
    for l in range(cfg.n_layers):
        want, got = layers.host_layer(loaded, l), lazy["layers"][l]
        assert want.keys() == got.keys()
        for k in want:
            assert got[k].dtype == want[k].dtype
            np.testing.assert_array_equal(got[k], want[k])


def test_an_interrupted_refactor_resumes_at_the_next_layer(tmp_path, monkeypatch):
    p = llama.init_params(CFG, jax.random.key(6))
    domain_batches = {d: _batches(i + 1, CFG, 3) for i, d in enumerate("abc")}
    st = stats.collect_stats(p, CFG, domain_batches, {})
    args = (
        p,
        CFG,
        st,
        0.5,
        RouterConfig(16, 2, 32),
        reconstruct.ReconstructConfig(),
        domain_batches,
    )
    want, _ = layerwise.refactor_per_layer(*args)
    solve, solved = reconstruct.solve_blocks, []

    def interrupted(*a, **kw):
        if len(solved) == 2:
            raise KeyboardInterrupt
        solved.append(1)
        return solve(*a, **kw)

    monkeypatch.setattr(reconstruct, "solve_blocks", interrupted)
    with pytest.raises(KeyboardInterrupt):
        layerwise.refactor_per_layer(*args, resume_dir=tmp_path)
    solved.clear()
    monkeypatch.setattr(
        reconstruct, "solve_blocks", lambda *a, **kw: solved.append(1) or solve(*a, **kw)
    )
    got, _ = layerwise.refactor_per_layer(*args, resume_dir=tmp_path)
    assert len(solved) == CFG.n_layers - 2  # the two finished layers are not refit again
    for (k, x), (_, y) in zip(
        jax.tree.leaves_with_path(want), jax.tree.leaves_with_path(got), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(y), np.asarray(x), err_msg=str(k))


CORPUS = Path(__file__).resolve().parents[1] / "fixtures" / "corpus"
DOMAINS = f"drama={CORPUS / 'shakespeare'},whaling={CORPUS / 'melville.jsonl'}"
RECIPES = {  # the recipe options of the refactor stage, each against the whole-model path
    "paper": {},
    "no_refit": {"refit": reconstruct.ReconstructConfig("none"), "static_control": True},
    "refit_subset": {"refit": reconstruct.ReconstructConfig(calib_sequences=1)},
    "kmeans_clusters": {"clusters": 3},
    "context_clusters": {"clusters": 3, "cluster_chunk": 8},
    "core_partition": {
        "construction": Construction("frequency", "core", "partition", 0.5),
        "static_control": True,
    },
    "core_overlap": {"construction": Construction("magnitude", "core", "overlap", 0.25)},
    "bfloat16": {"dtype": "bfloat16", "static_control": True, "seed": 3},
}


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    ck = random_checkpoint(vocab=49152, dim=32, layers=2, heads=4, kv_heads=2, ffn=64)
    cache = str(tmp_path_factory.mktemp("data"))
    return Recipe(checkpoint=ck, domains=DOMAINS, num_sequences=2, seq_len=32, data_cache=cache)


def _old_static_rows(r, src, kept):
    """The static control's refit as it was: the rows returned per layer, then stacked."""
    cfg, dense, tok = src
    n = r.refit.calib_sequences
    rows_in = [reconstruct.first_rows(bs, n) if n else bs for bs in r.batches(tok).values()]
    rows_in = [b for bs in rows_in for b in bs]
    zeros = [np.zeros(np.shape(b), int) for b in rows_in]
    fn = lambda l: ([kept[l]], [[0]])  # noqa: E731
    return np.stack(
        [x[0] for x in reconstruct.sequential_refit(dense, cfg, rows_in, zeros, fn, r.refit.ridge)]
    )


def _check_build(r, src, rm=None):
    built = build_readme(r, source=src)
    cfg, dense, tok = src
    groups = None
    if rm is not None:
        groups = lambda s, rows: router_assign(rm.params["router"], rm.rc.router, cfg, rows)  # noqa: E731
    elif r.cluster_chunk:
        groups = lambda s, rows: construct.prefix_groups(dense, cfg, s, rows, 0.5)  # noqa: E731
    args = (r.remain_rate, r.router, r.refit, r.batches(tok), r.seed, r.construction, groups)
    want, spec = _whole_model_build(dense, cfg, built.stats, *args)
    if rm is not None:
        want = {**want, "router": rm.params["router"]}
    _assert_same_params(want, built.model.params)
    assert built.model.spec.domains == spec.domains
    np.testing.assert_array_equal(built.model.spec.expert_idx_LxExFe, spec.expert_idx_LxExFe)
    assert built.model.meta["recipe"] == r.describe(tok.name)
    if r.static_control and r.refit.mode != "none":
        kept = built.static.kept_LxK
        np.testing.assert_array_equal(built.static.w_down_LxKxD, _old_static_rows(r, src, kept))
    return built


@pytest.mark.parametrize("name", list(RECIPES))
def test_the_recipes_refactor_stage_equals_the_whole_model_path(name, recipe):
    r = dataclasses.replace(recipe, **RECIPES[name])
    src = models.load_dense(r.checkpoint, r.dtype, r.scan_layers, r.seed)
    built = _check_build(r, src)
    assert built.model.params["backbone"]["layers"]["expert_down"].dtype == np.dtype(r.dtype)


def test_experts_refit_around_a_routers_groups_equal_the_whole_model_path(recipe, tmp_path):
    src = models.load_dense(recipe.checkpoint, recipe.dtype, recipe.scan_layers, recipe.seed)
    k3 = build_readme(dataclasses.replace(recipe, clusters=3), source=src).model
    k3.params["router"]["head"] = k3.params["router"]["head"] * 50.0
    path = models.save_readme(tmp_path / "r", k3.params, k3.rc, k3.spec, k3.meta)
    r = dataclasses.replace(recipe, clusters=3, cluster_router=str(path))
    _check_build(r, src, models.load_readme(path))
