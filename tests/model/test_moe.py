"""MoE dispatch equals the dense masked reference; expert parallelism equals one device."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from moe_reference import masked_experts  # tests/moe_reference.py (pytest puts tests/ on the path)

from readme_jax.model import llama, moe
from readme_jax.model.config import LlamaConfig
from readme_jax.refactor import experts as ex

CFG = LlamaConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48)
E = 4


@functools.cache  # one build per module: no test changes the arrays or dicts it returns
def _setup(remain=0.5, seed=0):
    rng = np.random.default_rng(seed)
    dense = llama.init_params(CFG, jax.random.key(seed))
    scores = rng.random((E, CFG.n_layers, CFG.ffn_dim))
    spec = ex.build_expert_spec(scores, remain, [f"d{i}" for i in range(E)])
    return dense, spec, ex.build_moe_params(dense, spec)


def _routing(B, S, k, seed=1, gate=False):
    key = jax.random.key(seed)
    logits = jax.random.normal(key, (B, S, E))
    from readme_jax.model.router import top_k_routing

    return top_k_routing(logits, k, gate)


@pytest.mark.parametrize("k,gate", [(1, False), (2, False), (2, True)])
@pytest.mark.parametrize("dispatch", moe.DISPATCH_MODES)
def test_moe_equals_dense_masked_reference(k, gate, dispatch):
    dense, spec, mp = _setup()
    toks = jax.random.randint(jax.random.key(3), (2, 7), 0, CFG.vocab_size)
    routing = _routing(2, 7, k, gate=gate)
    mcfg = moe.MoEConfig(E, top_k=k, gate_scaling=gate, dispatch=dispatch)
    got, _, _ = moe.moe_forward(mp, toks, CFG, mcfg, routing)
    sh, em = ex.expert_channel_masks(spec, CFG.ffn_dim)
    want, _, _ = llama.forward(dense, toks, CFG, ffn=ex.dense_masked_ffn(sh, em, routing))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    # and the reference differs from the plain dense model (the mask matters)
    full, _, _ = llama.forward(dense, toks, CFG)
    assert np.abs(np.asarray(full - want)).max() > 1e-3


def test_padding_changes_nothing():
    dense, spec, mp = _setup()
    routing = _routing(1, 5, 1)
    toks = jnp.arange(5)[None]
    mcfg = moe.MoEConfig(E)
    fwd = jax.jit(moe.moe_forward, static_argnums=(2, 3))  # eager: every op compiles alone
    base, _, _ = fwd(mp, toks, CFG, mcfg, routing)
    # widen every expert and the shared part with extra zero-padded channels
    pad = lambda idx: np.concatenate([idx, -np.ones(idx.shape[:-1] + (5,), np.int32)], -1)
    spec2 = ex.ExpertSpec(
        spec.domains,
        spec.remain_rate,
        spec.domain_masks_ExLxF,
        pad(spec.shared_idx_LxFs),
        pad(spec.expert_idx_LxExFe),
    )
    mp2 = ex.build_moe_params(dense, spec2)
    assert mp2["layers"]["expert_down"].shape[-2] == mp["layers"]["expert_down"].shape[-2] + 5
    wide, _, _ = fwd(mp2, toks, CFG, mcfg, routing)
    np.testing.assert_allclose(base, wide, atol=1e-6)


def test_shared_and_private_partition_domain_mask():
    _, spec, _ = _setup()
    sh, em = ex.expert_channel_masks(spec, CFG.ffn_dim)
    for e in range(E):
        union = (sh + em[:, e]) > 0
        np.testing.assert_array_equal(union, spec.domain_masks_ExLxF[e])
        assert (sh * em[:, e]).sum() == 0  # disjoint
    assert np.all(spec.domain_masks_ExLxF.sum(-1) == round(0.5 * CFG.ffn_dim))


@pytest.mark.parametrize("S", [40, 3, 1])  # 40: select switches blocks; 1: the single-token path
@pytest.mark.parametrize(
    "trim,align,fuse", [(False, 1, False), (True, 1, False), (True, 8, False), (True, 1, True)]
)
def test_select_dispatch_on_unstacked_decode_layout(trim, align, fuse, S):
    _, spec, mp = _setup()
    routing = _routing(1, S, 1)
    toks = jnp.arange(S)[None]
    a, _, _ = moe.moe_forward(mp, toks, CFG, moe.MoEConfig(E), routing)
    dec = moe.unstack_experts(mp, trim=trim, align=align, fuse_shared=fuse)
    if fuse:  # per expert: the layer's shared channels, then the expert's own
        for i, lp in enumerate(dec["layers"]):
            li = jax.tree.map(lambda x, i=i: x[i], mp["layers"])
            ws = lp["shared_down"].shape[0]
            for e in range(E):
                w = lp["expert_down"][e].shape[0]
                np.testing.assert_array_equal(
                    lp["fused_down"][e],
                    np.concatenate([li["shared_down"][:ws], li["expert_down"][e][:w]]),
                )
    b, _, _ = moe.moe_forward(dec, toks, CFG, moe.MoEConfig(E, dispatch="select"), routing)
    np.testing.assert_allclose(a, b, atol=1e-5)
    widths = [[d.shape[0] for d in lp["expert_down"]] for lp in dec["layers"]]
    shared = [lp["shared_down"].shape[0] for lp in dec["layers"]]
    padded = mp["layers"]["expert_down"].shape[2]
    padded_shared = mp["layers"]["shared_down"].shape[1]
    if trim:  # each expert and each layer's shared part keep their real channels (rounded up)
        want = np.minimum(-(-spec.expert_widths // align) * align, padded)
        np.testing.assert_array_equal(widths, want)
        assert want.min() < padded or align > 1
        want_shared = np.minimum(-(-spec.shared_widths // align) * align, padded_shared)
        np.testing.assert_array_equal(shared, want_shared)
        assert spec.shared_widths.min() < padded_shared  # the setup has padding to cut
        if fuse:
            fused = [[d.shape[0] for d in lp["fused_down"]] for lp in dec["layers"]]
            np.testing.assert_array_equal(fused, want + want_shared[:, None])
    else:
        assert widths == [[padded] * E] * CFG.n_layers
        assert shared == [padded_shared] * CFG.n_layers


@pytest.mark.multidevice
def test_expert_parallel_equals_single_device_forward_and_grad():
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    _, _, mp = _setup()
    mesh = jax.make_mesh((2, 4), ("data", "expert"), axis_types=(AxisType.Explicit,) * 2)
    toks = jax.random.randint(jax.random.key(5), (4, 6), 0, CFG.vocab_size)
    routing = _routing(4, 6, 2)
    mcfg = moe.MoEConfig(E, top_k=2)

    def loss(p, mesh):
        logits, _, _ = moe.moe_forward(p, toks, CFG, mcfg, routing, mesh=mesh)
        return jnp.mean(jax.nn.logsumexp(logits, -1)), logits

    (l1, y1), g1 = jax.jit(jax.value_and_grad(lambda p: loss(p, None), has_aux=True))(mp)
    with jax.set_mesh(mesh):
        shard = lambda path, a: jax.device_put(
            a,
            NamedSharding(
                mesh, P(None, "expert") if "expert_" in jax.tree_util.keystr(path) else P()
            ),
        )
        mps = jax.tree_util.tree_map_with_path(shard, mp)
        (l2, y2), g2 = jax.jit(jax.value_and_grad(lambda p: loss(p, mesh), has_aux=True))(mps)
    np.testing.assert_allclose(y1, y2, atol=1e-5)
    np.testing.assert_allclose(l1, l2, atol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.multidevice
@pytest.mark.parametrize(
    "T,want", [(8, "P('data',), P('data',), P('data',)"), (3, "P(), P(), P()")]
)
def test_expert_parallel_shards_tokens_over_data_and_experts_over_expert(T, want):
    """Each device computes its data shard's tokens with its local experts (no replicated
    compute over `data`); a token count the data axis cannot split is replicated instead."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    from jax.sharding import AxisType

    mesh = jax.make_mesh((2, 4), ("data", "expert"), axis_types=(AxisType.Explicit,) * 2)
    f = moe.expert_parallel(moe.ragged_experts, mesh)
    k = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(k[0], (T, 4))
    e = jax.random.randint(k[1], (T, 1), 0, 4)
    w = jnp.ones((T, 1))
    gu, dn = jax.random.normal(k[2], (4, 4, 2, 3)), jax.random.normal(k[3], (4, 3, 4))
    with jax.set_mesh(mesh):
        text = str(jax.make_jaxpr(f)(x, e, w, gu, dn))
        y = jax.jit(f)(x, e, w, gu, dn)
    assert f"in_specs=({want}, P('expert',), P('expert',))" in text
    np.testing.assert_allclose(y, moe.ragged_experts(x, e, w, gu, dn), rtol=1e-5, atol=1e-5)


# B=1: the fused single-token switch; B=2: select conds. P=40: the prompt runs through
# switched blocks. Two pairs cover each path of each (the other two pairs added 30 s, no path).
@pytest.mark.parametrize(
    ("B", "P", "layout"),
    [(1, 5, "trimmed"), (2, 40, "trimmed"), (1, 5, "stacked"), (2, 40, "stacked")],
)
def test_readme_cached_decode_equals_greedy_reforward(B, P, layout):
    """Generator (prefill with last-position logits, then cached decode steps) gives the
    greedy tokens of a full re-forward per token, in the trimmed decode layout and in the
    stored (stacked) one, whose prepared backbone is the stored arrays themselves."""
    from readme_jax.decode.generator import Generator
    from readme_jax.decode.steps import readme_model
    from readme_jax.model.config import ReadMEConfig, RouterConfig
    from readme_jax.model.readme import readme_forward
    from readme_jax.model.router import init_router

    dense, _, mp = _setup()
    cfg = CFG.replace(max_seq_len=128)
    rc = ReadMEConfig(cfg, moe.MoEConfig(E), RouterConfig(dim=16, n_heads=2, ffn_dim=32))
    router = init_router(rc.router, cfg, E, jax.random.key(4), backbone_embed_VxD=dense["embed"])
    params = {"backbone": mp, "router": router}
    prompts = [[5, 17, 33, 2 + b, 60, *range(7, 7 + P - 5)] for b in range(B)]
    assert (B * P > moe.SELECT_SWITCH_MIN) == (P == 40)  # which prompt path select takes
    gen = Generator(readme_model(rc, layout=layout), params)
    if layout == "stacked":  # no second copy of the backbone
        assert all(
            a is b
            for a, b in zip(
                jax.tree.leaves(gen.params["backbone"]), jax.tree.leaves(mp), strict=True
            )
        )
    got = gen.generate(prompts, 6, eos_ids=[])

    @jax.jit  # one program at one width (eager ops would compile one per op and shape)
    def fwd(row_1x64):
        logits, aux = readme_forward(params, row_1x64, rc)
        return logits[0], aux["routing"][0][0]  # [64, V], experts [64, A]

    def padded(ids):  # right-padded to one width: the model and router are causal
        row = np.zeros((1, 64), np.int32)
        row[0, : len(ids)] = ids
        return row

    for b, p in enumerate(prompts):
        ids = list(p)
        for _ in range(6):
            ids.append(int(np.argmax(np.asarray(fwd(padded(ids))[0])[len(ids) - 1])))
        assert got[b] == ids[len(p) :]
    routes = np.asarray(fwd(padded(ids))[1])[: len(ids)]
    assert len(np.unique(routes)) > 1  # the decode switched experts on the way


@pytest.mark.parametrize("K", [1, 2])
def test_blocked_dispatch_equals_masked_in_value_and_gradient(K):
    """Groups of uneven size spanning several blocks, one expert unused: the blocked grouped
    matmul (gathered weights, or one switch per block) equals every-expert-on-every-token,
    forward and gradients (x and expert weights). Both reads against one reference (compiled
    once per K: 4 -> 2 compiles of the reference's forward and gradient)."""
    T, D, F = 45, 16, 12
    ks = jax.random.split(jax.random.key(7), 4)
    x = jax.random.normal(ks[0], (T, D))
    gu = jax.random.normal(ks[1], (E, D, 2, F)) * 0.3
    down = jax.random.normal(ks[2], (E, F, D)) * 0.3
    e = jax.random.choice(ks[3], np.array([0, 1, 3]), (T, K))  # expert 2 unused
    w = jax.nn.softmax(jax.random.normal(ks[0], (T, K)), -1)

    def loss(fn, **kw):
        return lambda x, gu, down: jnp.sum(jnp.sin(fn(x, e, w, gu, down, **kw)))

    # jitted, as training runs them (eager, every op compiles on its own); the reference once
    want = jax.jit(masked_experts)(x, e, w, gu, down)
    g2 = jax.jit(jax.grad(loss(masked_experts), (0, 1, 2)))(x, gu, down)
    for read in ("gather", "switch"):
        fn = functools.partial(moe.blocked_experts, read=read)
        for blk in (8, 128):  # 8: several blocks per expert; 128: clamped to ~T*K/E rows
            got = jax.jit(functools.partial(fn, block=blk))(x, e, w, gu, down)
            np.testing.assert_allclose(got, want, atol=1e-5, err_msg=f"{read} {blk}")
            g1 = jax.jit(jax.grad(loss(fn, block=blk), (0, 1, 2)))(x, gu, down)
            for a, b in zip(g1, g2, strict=True):
                np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5, err_msg=f"{read} {blk}")


def test_eval_logits_fn_equals_ragged_readme_forward():
    """The evaluation's logits function (blocked dispatch on CPU) gives the model's logits."""
    from readme_jax.eval.pipeline import readme_logits_fn
    from readme_jax.model.config import ReadMEConfig, RouterConfig
    from readme_jax.model.readme import readme_forward
    from readme_jax.model.router import init_router

    dense, _, mp = _setup()
    rc = ReadMEConfig(CFG, moe.MoEConfig(E), RouterConfig(dim=16, n_heads=2, ffn_dim=32))
    router = init_router(rc.router, CFG, E, jax.random.key(4), backbone_embed_VxD=dense["embed"])
    params = {"backbone": mp, "router": router}
    toks = jax.random.randint(jax.random.key(9), (3, 40), 0, CFG.vocab_size)
    want, aux = jax.jit(readme_forward, static_argnums=2)(params, toks, rc)
    routes = aux["routing"][0]
    assert len(np.unique(np.asarray(routes))) > 1  # several experts in play
    np.testing.assert_allclose(readme_logits_fn(rc)(params, toks), want, atol=1e-5)


def test_routing_analysis_names_the_experts_and_counts_usage_by_domain():
    """Expert labels come from the caller (cluster0.. for clustered experts), usage rows from
    the evaluated domains; every routed token is counted once."""
    from readme_jax.eval.pipeline import routing_analysis
    from readme_jax.model.config import ReadMEConfig, RouterConfig
    from readme_jax.model.router import init_router

    dense, _, mp = _setup()
    rc = ReadMEConfig(CFG, moe.MoEConfig(E), RouterConfig(dim=16, n_heads=2, ffn_dim=32))
    router = init_router(rc.router, CFG, E, jax.random.key(4), backbone_embed_VxD=dense["embed"])
    params = {"backbone": mp, "router": router}
    streams = {
        d: (np.asarray(jax.random.randint(jax.random.key(i), (40,), 0, CFG.vocab_size)), None)
        for i, d in enumerate(["fiction", "drama"])
    }
    names = [f"cluster{e}" for e in range(E)]
    out = routing_analysis(rc, params, streams, names, window=16)
    assert out["experts"] == names
    assert out["usage"]["domains"] == ["fiction", "drama"]
    assert np.asarray(out["usage"]["counts"]).sum() == 2 * 32  # two windows of 16 per domain


def test_forward_last_position_logits_equal_full_logits_there():
    """llama.forward(..., last_B=) (the prefill path): per row, the full logits at that row's
    position, for the dense decoder and for the Read-ME decode step."""
    from readme_jax.decode.steps import dense_model, readme_model
    from readme_jax.model.config import ReadMEConfig, RouterConfig
    from readme_jax.model.router import init_router

    dense, _, mp = _setup()
    rc = ReadMEConfig(CFG, moe.MoEConfig(E), RouterConfig(dim=16, n_heads=2, ffn_dim=32))
    router = init_router(rc.router, CFG, E, jax.random.key(4), backbone_embed_VxD=dense["embed"])
    toks = jax.random.randint(jax.random.key(2), (2, 9), 0, CFG.vocab_size)
    last = jnp.array([8, 3])
    for model, params in (
        (dense_model(CFG), dense),
        (readme_model(rc), {"backbone": mp, "router": router}),
    ):
        step = jax.jit(model.step)  # one program per call (eager: one per op)
        full, _ = step(params, toks, model.new_cache(2, 16), None)
        got, _ = step(params, toks, model.new_cache(2, 16), None, last)
        assert got.shape == (2, 1, CFG.vocab_size)
        np.testing.assert_allclose(got[:, 0], full[jnp.arange(2), last], atol=1e-5)


def test_pick_dispatch_is_the_one_decision():
    """prefill/decode read only the used experts (select) everywhere; training with "auto" and
    evaluation of a ragged model use blocked on CPU and keep ragged on accelerators; an
    explicit mode wins; an unknown phase is an error."""
    pick = moe.pick_dispatch
    assert pick("cpu", "decode") == pick("gpu", "prefill") == "select"
    assert pick("cpu", "train", override="auto") == pick("cpu", "eval") == "blocked"
    assert pick("gpu", "train", override="auto") == pick("tpu", "eval") == "ragged"
    assert pick("cpu", "train") == "ragged"  # "" = the model's
    assert pick("cpu", "decode", override="blocked") == "blocked"
    assert len(moe.DISPATCH_MODES) == 3
    with pytest.raises(ValueError, match="phase"):
        pick("cpu", "serve")
