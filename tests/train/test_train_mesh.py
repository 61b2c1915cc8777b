"""The train step on a (data, fsdp, expert) mesh of 8 fake CPU devices, and the dry run."""

import copy
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_helpers import build

from readme_jax.data import make_iterator
from readme_jax.train import context, loop
from readme_jax.train import mesh as meshlib
from readme_jax.train.config import resolve
from readme_jax.train.dry_run import dry_run
from readme_jax.train.variants import make_variant

pytestmark = pytest.mark.multidevice


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    return build(tmp_path_factory.mktemp("tiny"))


def _one_step_each_phase(c, tok, teacher, data, fsdp, expert, dispatch=None):
    c = copy.deepcopy(c)
    c.mesh.data, c.mesh.fsdp, c.mesh.expert = data, fsdp, expert
    if dispatch is not None:
        c.train.dispatch = dispatch
    ctx = context.build_context(c, Path(c.run_dir), resolve(c), tok, teacher)
    var = make_variant(ctx, "readme")
    params = context.place(var.params, ctx.mesh)
    p_abs = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), params
    )
    consts = {
        "teacher": context.place(context.training_layout(ctx.teacher, False), ctx.mesh),
        "union": jax.device_put(context.union_mask(ctx), meshlib.replicated(ctx.mesh)),
    }
    it = make_iterator(context.pipeline_config(ctx), tok, ctx.cache)
    losses, out = [], None
    for phase in ("router", "expert"):
        ph = loop.Phase(ctx, var, phase, p_abs)
        state = ph.fresh_state(params if out is None else out)
        state, met = ph.step(
            state, consts, meshlib.global_batch(next(it), ctx.mesh), jnp.float32(1e-2)
        )
        losses.append(float(met["loss"]))
        out = state["params"]
    return losses, jax.device_get(out), ctx.mesh


@pytest.fixture(scope="module")
def one_device(tiny):
    """One step of each phase on one device with the config's dispatch ("auto"): the reference
    of the mesh test and the blocked side of the dispatch test (one compile for both)."""
    c, tok, teacher = tiny
    assert c.train.dispatch == "auto"
    return _one_step_each_phase(c, tok, teacher, 1, 1, 1)


def test_step_on_8_devices_data2_expert4_matches_one_device(tiny, one_device):
    c, tok, teacher = tiny
    one, p1, m1 = one_device
    eight, p8, m8 = _one_step_each_phase(c, tok, teacher, 2, 1, 4)
    assert m1.devices.size == 1 and dict(m8.shape) == {"data": 2, "fsdp": 1, "expert": 4}
    np.testing.assert_allclose(eight, one, rtol=2e-5)
    # Tokens are sharded over `data`, so gradient sums run in another order. Adam's first step
    # divides each gradient by its own magnitude, which turns an order-of-summation difference
    # in a near-zero gradient into a parameter difference of up to ~1e-5 (lr 1e-2).
    chex.assert_trees_all_close(p1, p8, rtol=1e-4, atol=5e-5)


def test_blocked_train_dispatch_matches_ragged(tiny, one_device):
    """train.dispatch=auto picks `blocked` on CPU: the same losses and updated parameters."""
    from readme_jax.model.moe import pick_dispatch

    assert pick_dispatch("cpu", "train", override="auto") == "blocked"
    assert pick_dispatch("cpu", "train", override="") == "ragged"  # the model's
    c, tok, teacher = tiny
    rag, pr, _ = _one_step_each_phase(c, tok, teacher, 1, 1, 1, "ragged")
    blk, pb, _ = one_device  # dispatch "auto"
    np.testing.assert_allclose(blk, rag, rtol=2e-5)
    chex.assert_trees_all_close(pr, pb, rtol=1e-4, atol=5e-5)


def test_expert_weights_and_batches_are_sharded_by_the_rules(tiny):
    mesh = meshlib.make_mesh(2, 2, 2)
    from jax.sharding import PartitionSpec as P

    layers = {
        "expert_gate_up": jnp.zeros((2, 4, 32, 2, 16)),
        "wqkv": jnp.zeros((2, 32, 8, 8)),
        "attn_norm": jnp.zeros((2, 32)),
    }
    tree = {"backbone": {"layers": layers, "embed": jnp.zeros((256, 32))}}
    sh = meshlib.param_shardings(tree, mesh)
    assert sh["backbone"]["layers"]["expert_gate_up"].spec == P(None, "expert", "fsdp", None, None)
    assert sh["backbone"]["layers"]["wqkv"].spec == P(None, "fsdp", None, None)
    assert sh["backbone"]["layers"]["attn_norm"].spec == P(None, None)
    assert sh["backbone"]["embed"].spec == P(None, "fsdp")
    assert meshlib.batch_sharding(mesh).spec == P(("data", "fsdp"), None)


def test_dry_run_compiles_the_tiny_steps_on_a_3d_mesh(tiny, capsys):
    c = copy.deepcopy(tiny[0])
    c.mesh.data, c.mesh.fsdp, c.mesh.expert = 1, 2, 4
    c.model.checkpoint = "random:vocab=256,dim=32,layers=2,heads=4,kv_heads=2,ffn=64"
    out = dry_run(c)
    assert set(out) == {"router", "expert"}
    assert all(r["peak_bytes"] > r["params_opt_bytes"] > 0 for r in out.values())
    assert "estimated peak" in capsys.readouterr().out


@pytest.mark.slow
def test_llama2_7b_dry_run_compiles_on_8_fake_devices(capsys):
    from configs.llama2_7b import get_config

    c = get_config()
    out = dry_run(c)
    exp = out["expert"]
    # 6.7B teacher in bf16 sharded 8 ways ~ 1.6 GiB per device; training state is larger
    assert 1.4 * 2**30 < exp["teacher_bytes"] < 1.8 * 2**30
    assert exp["params_opt_bytes"] > exp["teacher_bytes"]
    assert "llama2_7b" in capsys.readouterr().out
