"""The training loop on a tiny model and real text: frozen parameters, exact resume, damaged
checkpoints, non-finite losses."""

import copy
import json
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict
from train_helpers import build, copy_run

from readme_jax.checkpoints import models, store
from readme_jax.checkpoints.errors import CheckpointError
from readme_jax.data import make_iterator
from readme_jax.train import context, loop
from readme_jax.train import mesh as meshlib
from readme_jax.train.config import TrainConfig, TrainConfigError, resolve
from readme_jax.train.variants import make_variant


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def full_run(tiny, tmp_path_factory):
    """The uninterrupted reference run: 2 rounds x (2 router + 2 expert) steps."""
    c, tok, teacher = tiny
    c = copy_run(c, tmp_path_factory.mktemp("full"))
    loop.run_training(c, Path(c.run_dir), tokenizer=tok, teacher=teacher)
    return c


def _losses(c) -> dict[int, float]:
    path = Path(c.run_dir) / "train" / "readme" / "metrics.jsonl"
    return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines())}


def _params(c):
    return store.load_params(Path(c.run_dir) / "moe_trained")


def _leaves(tree):
    return {
        jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)
    }


def test_phases_leave_frozen_parameters_bit_identical_with_no_optimizer_state(tiny, tmp_path):
    c, tok, teacher = tiny
    c = copy_run(c, tmp_path / "r")
    ctx = context.build_context(c, Path(c.run_dir), resolve(c), tok, teacher)
    var = make_variant(ctx, "readme")
    params = context.place(var.params, ctx.mesh)
    p_abs = jax.eval_shape(lambda p: p, params)
    consts = {
        "teacher": context.place(context.training_layout(ctx.teacher, False), ctx.mesh),
        "union": context.union_mask(ctx),
    }
    it = make_iterator(context.pipeline_config(ctx), tok, ctx.cache)
    before = _leaves(params)
    for phase in ("router", "expert"):
        ph = loop.Phase(ctx, var, phase, p_abs)
        state = ph.fresh_state(params)
        opt_shapes = [tuple(x.shape) for x in jax.tree.leaves(state["opt"]) if x.ndim]
        pairs = zip(jax.tree.leaves(params), jax.tree.leaves(ph.labels), strict=True)
        n_train = [tuple(x.shape) for x, lab in pairs if lab == "train"]
        assert sorted(opt_shapes) == sorted(n_train * 2)  # Adam mu and nu, trainable leaves only
        batch = meshlib.global_batch(next(it), ctx.mesh)
        state, _ = ph.step(state, consts, batch, jnp.float32(1e-2))
        after = _leaves(state["params"])
        trained = (
            {k for k in before if "router" in k}
            if phase == "router"
            else {
                k
                for k in before
                if any(f in k for f in ("shared_", "expert_gate_up", "expert_down"))
            }
        )
        for k in before:
            if k in trained:
                assert not np.array_equal(before[k], after[k]), f"{phase}: {k} did not change"
            else:
                assert np.array_equal(before[k], after[k]), f"{phase}: frozen {k} changed"
        params = jax.tree.map(jnp.copy, state["params"])
        before = _leaves(params)


def test_kill_and_resume_reproduces_the_uninterrupted_losses(full_run, tiny, tmp_path):
    c, tok, teacher = tiny
    c = copy_run(c, tmp_path / "r")
    c.train.save_every = 2
    c.train.stop_after = 5  # steps 1-5 run; checkpoint at 4 (and phase ends 2, 4); 5 is lost
    res = loop.run_training(c, Path(c.run_dir), tokenizer=tok, teacher=teacher)
    assert res["stopped"] and not (Path(c.run_dir) / "moe_trained").exists()
    c.train.stop_after = 0
    loop.run_training(c, Path(c.run_dir), tokenizer=tok, teacher=teacher)
    want, got = _losses(full_run), _losses(c)
    assert sorted(got) == sorted(want) == list(range(1, 9))
    assert got == want  # bit-exact
    a, b = _leaves(_params(full_run)), _leaves(_params(c))
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_checkpoint_trained_from_other_starting_weights(tiny, tmp_path):
    """A checkpoint keeps what its training started from; after the refactored model (or the
    static baseline's refit) changes, resuming it would mix two recipes, so it is refused."""
    c, tok, teacher = tiny
    c = copy_run(c, tmp_path / "r")
    run = Path(c.run_dir)
    c.train.save_every = 2
    c.train.stop_after = 3  # a checkpoint at step 2
    loop.run_training(c, run, tokenizer=tok, teacher=teacher)
    before = loop.init_fingerprint(run, "static")
    assert before.endswith("static refit none")
    (run / "moe_init" / "static_refit.npz").write_bytes(b"rows")
    assert loop.init_fingerprint(run, "static") != before
    assert loop.init_fingerprint(run, "readme") in before
    meta = run / "moe_init" / "model.json"
    rec = json.loads(meta.read_text())
    meta.write_text(json.dumps({**rec, "saved_at": "refactored again"}))
    c.train.stop_after = 0
    with pytest.raises(context.TrainingError, match="other starting weights"):
        loop.run_training(c, run, tokenizer=tok, teacher=teacher)


def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(full_run, tiny, tmp_path):
    c, tok, teacher = tiny
    c = copy_run(c, tmp_path / "r")
    c.train.stop_after = 5  # checkpoints at steps 2 and 4
    loop.run_training(c, Path(c.run_dir), tokenizer=tok, teacher=teacher)
    ckdir = Path(c.run_dir) / "train" / "readme" / "ckpt"
    assert sorted(int(p.name) for p in ckdir.iterdir() if p.name.isdigit()) == [2, 4]
    for f in (ckdir / "4" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"\x00garbage")
    c.train.stop_after = 0
    with pytest.warns(UserWarning, match=r"ckpt/4 could not be restored"):
        loop.run_training(c, Path(c.run_dir), tokenizer=tok, teacher=teacher)
    assert _losses(c) == _losses(full_run)
    redone = [f.read_bytes() for f in (ckdir / "4" / "state").rglob("*") if f.is_file()]
    assert redone and b"\x00garbage" not in redone  # step 4 was saved again, not skipped


def test_a_nan_loss_stops_with_a_clear_error_and_keeps_good_checkpoints(tiny, tmp_path):
    c, tok, teacher = tiny
    c = copy_run(c, tmp_path / "r")
    c.train.router_lr = 1e30  # the router's weights blow up until its logits are inf/nan
    with pytest.raises(loop.TrainingError, match=r"loss is nan at step \d+ .*resume=True") as e:
        loop.run_training(c, Path(c.run_dir), tokenizer=tok, teacher=teacher)
    bad = int(re.search(r"at step (\d+)", str(e.value)).group(1))
    run = Path(c.run_dir)
    saved = sorted(int(p.name) for p in (run / "train/readme/ckpt").iterdir() if p.name.isdigit())
    assert saved and max(saved) == bad - 1
    assert list(_losses(c)) == list(range(1, bad))
    assert all(np.isfinite(v) for v in _losses(c).values())
    assert not (run / "moe_trained").exists()
    shutil.rmtree(run)


def test_baselines_train_on_the_same_batches_and_save_loadable_models(tiny, tmp_path):
    c, tok, teacher = tiny
    c = copy_run(c, tmp_path / "r")
    c.train.rounds, c.train.router_steps, c.train.expert_steps = 1, 1, 1
    c.train.baselines = "layerwise,static"
    summary = loop.run_training(c, Path(c.run_dir), tokenizer=tok, teacher=teacher)
    run = Path(c.run_dir)
    assert set(summary) >= {"readme", "layerwise", "static"}
    lw = models.load_readme(run / "baseline_layerwise")
    assert lw.rc.moe.layerwise and "router" not in lw.params
    meta = store.read_meta(run / "baseline_static")
    assert meta["kind"] == "dense_llama" and meta["config"]["ffn_dim"] == 32  # half of 64
    recs = {}
    for kind in ("readme", "layerwise", "static"):
        path = run / "train" / kind / "metrics.jsonl"
        recs[kind] = [json.loads(x) for x in path.read_text().splitlines()]
    # the static model has no router phase but trains its expert phase on the same batch
    assert [r["step"] for r in recs["static"]] == [2]
    assert [r["phase"] for r in recs["layerwise"]] == ["router", "expert"]
    assert 0 < recs["layerwise"][0]["router_acc"] <= 1


def _steps_on_disk(ckdir: Path) -> list[int]:
    return sorted(int(p.name) for p in ckdir.iterdir() if p.name.isdigit())


def test_a_full_disk_stops_the_run_in_one_error_and_it_resumes_once_space_is_freed(
    full_run, tiny, tmp_path, monkeypatch
):
    """The space check before each train-state save (the disk is made to look full from the
    second checkpoint on): the run stops with the one error, the first checkpoint intact; with
    the space back it resumes from there and ends as the uninterrupted run did."""
    c, tok, teacher = tiny
    c = copy_run(c, tmp_path / "r")
    c.train.keep = 1
    ckdir = Path(c.run_dir) / "train" / "readme" / "ckpt"
    real = shutil.disk_usage

    def usage(path):
        u = real(path)
        full = Path(path) == ckdir and _steps_on_disk(ckdir)  # after the first checkpoint
        return u._replace(free=1 << 20) if full else u

    monkeypatch.setattr(shutil, "disk_usage", usage)
    with pytest.raises(CheckpointError) as e:
        loop.run_training(c, Path(c.run_dir), tokenizer=tok, teacher=teacher)
    msg = str(e.value)
    assert msg.startswith(f"not enough free disk space to save train-state checkpoint step 4 in "
                          f"{ckdir}: it needs about ")  # fmt: skip
    assert f"the last checkpoint ({ckdir / '2'}) is intact" in msg and "resume=True" in msg
    assert _steps_on_disk(ckdir) == [2] and not (Path(c.run_dir) / "moe_trained").exists()
    monkeypatch.setattr(shutil, "disk_usage", real)  # space freed
    c.resume = True
    loop.run_training(c, Path(c.run_dir), tokenizer=tok, teacher=teacher)
    assert _losses(c) == _losses(full_run)
    assert _steps_on_disk(ckdir) == [8]  # train.keep=1
    a, b = _leaves(_params(full_run)), _leaves(_params(c))
    assert all(np.array_equal(a[k], b[k]) for k in a)


def _zero_middle(f: Path, n: int = 64) -> None:
    raw = bytearray(f.read_bytes())
    mid = len(raw) // 2
    raw[mid : mid + n] = bytes(n)
    f.write_bytes(bytes(raw))


def test_damaged_bytes_in_a_train_state_checkpoint_are_named(full_run, tiny, tmp_path):
    """64 zeroed bytes in the middle of the largest array file keep its size and orbax reads
    them as other weights; the checksum written with the step names the file. With an older
    checkpoint the run falls back to it (and ends as the uninterrupted run); with none, the
    resume stops with the error instead of training from the first step."""
    c, tok, teacher = tiny
    c = copy_run(c, tmp_path / "r")
    c.train.stop_after = 5  # checkpoints at steps 2 and 4
    loop.run_training(c, Path(c.run_dir), tokenizer=tok, teacher=teacher)
    ckdir = Path(c.run_dir) / "train" / "readme" / "ckpt"
    assert _steps_on_disk(ckdir) == [2, 4]
    assert (ckdir / "4" / store.MANIFEST).is_file()
    only = tmp_path / "only"
    shutil.copytree(c.run_dir, only)
    files = [f for f in (ckdir / "4" / "state").rglob("*") if f.is_file()]
    data = max(files, key=lambda f: f.stat().st_size)
    _zero_middle(data)
    c.train.stop_after = 0
    with pytest.warns(UserWarning, match=r"ckpt/4 could not be restored") as w:
        loop.run_training(c, Path(c.run_dir), tokenizer=tok, teacher=teacher)
    named = [str(x.message) for x in w if "differs from its checksum" in str(x.message)]
    assert len(named) == 1 and str(data) in named[0], [str(x.message) for x in w]
    assert _losses(c) == _losses(full_run)

    c2 = copy.deepcopy(c)
    c2.run_dir = str(only)
    ck2 = only / "train" / "readme" / "ckpt"
    shutil.rmtree(ck2 / "2")
    _zero_middle(ck2 / "4" / data.relative_to(ckdir / "4"))
    with pytest.warns(UserWarning, match="no earlier one is left"):
        with pytest.raises(CheckpointError, match="none of the 1 train-state checkpoints") as e:
            loop.run_training(c2, only, tokenizer=tok, teacher=teacher)
    assert "differs from its checksum" in str(e.value) and f"remove {ck2.parent}" in str(e.value)
    assert not (only / "moe_trained").exists()


def test_snapshot_token_counts_map_to_the_steps_that_end_them():
    tc = TrainConfig(rounds=2, router_steps=2, expert_steps=3, batch_size=2, seq_len=8,
                     snapshots=(0, 16, 80))  # fmt: skip
    # steps 1-2 router, 3-5 expert (16 tokens each), 6-7 router, 8-10 expert
    assert tc.expert_tokens_at() == {0: 0, 3: 16, 4: 32, 5: 48, 8: 64, 9: 80, 10: 96}
    assert tc.snapshot_steps() == {0: 0, 3: 16, 9: 80}
    for bad in ((20,), (112,)):
        with pytest.raises(TrainConfigError, match="multiples of 16 tokens"):
            TrainConfig(rounds=2, router_steps=2, expert_steps=3, batch_size=2, seq_len=8,
                        snapshots=bad).snapshot_steps()  # fmt: skip
    with pytest.raises(TrainConfigError, match="comma-separated token counts"):
        resolve(ConfigDict({"train": {"snapshots": "0,many"}}))


def test_snapshots_are_the_models_at_their_step_and_a_rerun_exports_kept_ones(tiny, tmp_path):
    """Snapshots at 0 and 2 expert steps (static control too), the final count equal to the
    trained model; deleted and asked again on a finished run, the kept checkpoint of its step
    gives the same weights; a count whose checkpoint is gone is named in a warning."""
    c, tok, teacher = tiny
    c = copy_run(c, tmp_path / "r")
    run = Path(c.run_dir)
    tc = resolve(c)
    per = tc.tokens_per_step("expert")  # steps 3-4 and 7-8 are the expert steps
    c.train.baselines = "static"
    c.train.snapshots = f"0,{2 * per},{4 * per}"
    loop.run_training(c, run, tokenizer=tok, teacher=teacher)
    snap = run / "snapshots"
    names = sorted(p.name for p in snap.iterdir())
    want = [f"{o}_{t}" for o in ("baseline_static", "moe_trained") for t in (0, 2 * per, 4 * per)]
    assert names == sorted(want)
    a, b = _leaves(store.load_params(run / "moe_init")), _leaves(store.load_params(snap / want[3]))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    a, b = _leaves(_params(c)), _leaves(store.load_params(snap / want[5]))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    mid = _leaves(store.load_params(snap / want[4]))
    assert not all(np.array_equal(a[k], mid[k]) for k in a)  # trained further after it
    assert store.read_meta(snap / want[4])["expert_tokens"] == 2 * per
    assert store.read_meta(run / "moe_trained")["expert_tokens"] == 4 * per
    static0 = store.read_meta(snap / "baseline_static_0")
    assert static0["kind"] == "dense_llama" and static0["config"]["ffn_dim"] == 32
    # a finished run asked again: step 4 (2 expert steps) is kept, step 7 (3) is not
    shutil.rmtree(snap / want[4])
    c.train.snapshots = f"{2 * per},{3 * per}"
    with pytest.warns(UserWarning, match=r"step 7 is not kept"):
        loop.run_training(c, run, tokenizer=tok, teacher=teacher)
    again = _leaves(store.load_params(snap / want[4]))
    assert all(np.array_equal(mid[k], again[k]) for k in mid)
    assert not (snap / f"moe_trained_{3 * per}").exists()
