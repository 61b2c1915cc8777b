"""Saving into too little space, write errors in orbax's writer, how many train-state
checkpoints a run keeps, and a clean exit after loading, saving and failing (real orbax
checkpoints of real tiny models; the disk is made small with RLIMIT_FSIZE in a child process,
or, for the check before writing, by reporting little free space)."""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from readme_jax.checkpoints import models, store
from readme_jax.checkpoints.errors import CheckpointError
from readme_jax.testing import tiny_readme
from readme_jax.train.checkpoint import TrainCheckpoints
from readme_jax.train.config import TrainConfig, TrainConfigError, validate

Usage = collections.namedtuple("Usage", "total used free")


def _state(scale: float, n: int = 64) -> dict:
    return {"w": jnp.full((n, 256), scale, jnp.float32), "b": jnp.arange(8.0) * scale}


def _abstract(state: dict):
    return lambda meta: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)


def _leaves_equal(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb, strict=True))


def test_a_save_that_does_not_fit_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    a, b = tiny_readme(num_experts=3, seed=1), tiny_readme(num_experts=3, seed=2)
    path = models.save_readme(tmp_path / "moe", a.params, a.rc, a.spec, a.meta)
    before = {f: f.read_bytes() for f in path.rglob("*") if f.is_file()}
    ck = TrainCheckpoints(tmp_path / "ckpt", keep=3)
    ck.save(1, _state(1.0), {"step": 1})

    real = shutil.disk_usage
    need = store.space_needed(store.tree_nbytes(b.params))
    # one byte short, counting the old parameters the save replaces
    free = need - store.dir_bytes(path / "params") - 1
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(*real(p)[:2], free))
    with pytest.raises(CheckpointError, match="not enough free disk space to save the model") as e:
        models.save_readme(path, b.params, b.rc, b.spec, b.meta)
    msg = str(e.value)
    assert str(path) in msg and "nothing was written" in msg and "\n" not in msg
    assert f"{store._human(need)} ({store._human(store.tree_nbytes(b.params))} of arrays" in msg
    assert {f: f.read_bytes() for f in path.rglob("*") if f.is_file()} == before
    with pytest.raises(CheckpointError, match="train-state checkpoint step 2") as e:
        ck.save(2, _state(2.0), {"step": 2})
    assert f"the last checkpoint ({tmp_path / 'ckpt' / '1'}) is intact" in str(e.value)
    assert "--config.resume=True" in str(e.value) and ck.steps() == [1]
    assert not list((tmp_path / "ckpt").glob(f"2{store.ORBAX_TMP}*"))

    free += 1  # exactly enough: both saves go through
    models.save_readme(path, b.params, b.rc, b.spec, b.meta)
    assert _leaves_equal(models.load_readme(path).params, b.params)
    monkeypatch.setattr(shutil, "disk_usage", real)
    ck.save(2, _state(2.0), {"step": 2})
    step, state, meta = ck.restore_latest(_abstract(_state(0.0)))
    assert (step, meta) == (2, {"step": 2}) and _leaves_equal(state, _state(2.0))
    ck.close()


@pytest.mark.parametrize("keep", [1, 2])
def test_a_run_keeps_exactly_its_last_k_checkpoints(tmp_path, keep):
    ck = TrainCheckpoints(tmp_path / "ckpt", keep=keep)
    for step in range(1, 6):
        ck.save(step, _state(float(step), n=4), {"step": step})
        assert ck.steps() == list(range(max(1, step - keep + 1), step + 1))
    on_disk = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert on_disk == [str(s) for s in range(6 - keep, 6)]  # no leftovers beside them
    step, state, _ = ck.restore_latest(_abstract(_state(0.0, n=4)))
    assert step == 5 and _leaves_equal(state, _state(5.0, n=4))
    ck.close()


def test_keeping_no_checkpoint_is_refused_with_the_key():
    with pytest.raises(TrainConfigError, match=r"^train.keep=0 is out of range: allowed >= 1"):
        validate(TrainConfig(keep=0))
    with pytest.raises(CheckpointError, match="train.keep=0"):
        TrainCheckpoints("unused", keep=0)


# One child process for the faults that need a small file-size limit (RLIMIT_FSIZE; SIGXFSZ
# ignored so a write past it fails with EFBIG, as on a full disk) and for the clean-exit check
# (its stderr must stay empty). It prints one JSON line per event.
CHILD = textwrap.dedent(
    """
    import json, os, resource, shutil, signal, sys, time
    from pathlib import Path
    import jax, jax.numpy as jnp
    from readme_jax.checkpoints import models, store
    from readme_jax.checkpoints.errors import CheckpointError
    from readme_jax.testing import tiny_readme
    from readme_jax.train.checkpoint import TrainCheckpoints

    root = Path(sys.argv[1])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    LIMIT = 4 << 10  # bytes per file: below any array of the tiny model (TensorStore moves a
    # write that fails at a larger limit to a new file and goes on)

    def out(**kw):
        print(json.dumps(kw), flush=True)

    def limit(n):
        resource.setrlimit(resource.RLIMIT_FSIZE, (n, resource.RLIM_INFINITY))

    def state(seed):  # 128 KiB of random values (orbax compresses: a constant takes bytes)
        return {"w": jax.random.normal(jax.random.key(seed), (128, 256))}

    def abstract(meta):
        return {"w": jax.ShapeDtypeStruct((128, 256), jnp.float32)}

    # a saved model: written, loaded, then overwritten under the limit
    m = tiny_readme(num_experts=3, seed=2)
    path = models.save_readme(root / "moe", m.params, m.rc, m.spec, m.meta)
    models.load_readme(path)
    limit(LIMIT)
    try:
        models.save_readme(path, m.params, m.rc, m.spec, m.meta)
        out(model="saved")
    except CheckpointError as e:
        out(model="error", model_msg=str(e), model_left=sorted(p.name for p in path.iterdir()))
    limit(resource.RLIM_INFINITY)

    # train-state checkpoints, keep=1: step 2 fails under the limit, then goes through
    ck = TrainCheckpoints(root / "ckpt", keep=1)
    ck.save(1, state(1), {"step": 1})
    limit(LIMIT)
    try:
        ck.save(2, state(2), {"step": 2})
        out(train="saved")
    except CheckpointError as e:
        out(train="error", train_msg=str(e), train_left=sorted(os.listdir(root / "ckpt")))
    got = ck.restore_latest(abstract)
    out(restored=got[0], value=float(got[1]["w"].sum()))
    limit(resource.RLIM_INFINITY)  # space freed
    ck.save(2, state(2), {"step": 2})
    got = ck.restore_latest(abstract)
    out(after=got[0], after_value=float(got[1]["w"].sum()),
        left_after=sorted(os.listdir(root / "ckpt")))
    ck.close()

    # reads that fail inside orbax (unverified load of garbage bytes), several times: each
    # failure used to leave TensorStore reads calling into a closed event loop
    bad = root / "bad"
    shutil.copytree(path, bad)
    for f in (bad / "params").rglob("d/*"):
        f.write_bytes(b"\\x00garbage")
    fails = 0
    for _ in range(6):
        try:
            models.load_readme(bad, verify=False)
        except CheckpointError:
            fails += 1
    time.sleep(0.5)  # the late reads finish (and used to print) here or at exit
    out(failed_loads=fails)
    """
)


@pytest.fixture(scope="module")
def child(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    env = dict(os.environ, READMEJAX_CACHE_DIR=str(root / "cache"))
    p = subprocess.run(
        [sys.executable, "-c", CHILD, str(root)], capture_output=True, text=True, env=env,
        timeout=300,
    )  # fmt: skip
    events = {}
    for line in p.stdout.splitlines():
        events.update(json.loads(line))
    return root, p, events


def test_a_write_error_in_a_model_save_is_one_error_and_frees_the_partial_files(child):
    root, p, ev = child
    assert p.returncode == 0, p.stderr[-3000:]
    assert ev["model"] == "error"
    msg = ev["model_msg"]
    assert msg.startswith(f"could not write the model's parameters to {root / 'moe' / 'params'}")
    assert "File too large" in msg and "the partial files were removed" in msg
    assert "\n" not in msg
    # no half-written params, no model.json or manifest: an interrupted save
    assert ev["model_left"] == ["experts"]
    with pytest.raises(CheckpointError, match="interrupted save"):
        models.load_readme(root / "moe")


def test_a_write_error_in_a_train_checkpoint_keeps_the_last_one_and_the_run_resumes(child):
    root, p, ev = child
    assert p.returncode == 0, p.stderr[-3000:]
    assert ev["train"] == "error"
    assert ev["train_msg"].startswith(
        f"could not write train-state checkpoint step 2 to {root / 'ckpt' / '2'}"
    )
    assert f"the last checkpoint ({root / 'ckpt' / '1'}) is intact" in ev["train_msg"]
    assert ev["train_left"] == ["1"]  # keep=1, and the failed step left nothing behind
    sums = [float(jax.random.normal(jax.random.key(s), (128, 256)).sum()) for s in (1, 2)]
    assert (ev["restored"], ev["value"]) == (1, sums[0])
    assert (ev["after"], ev["after_value"], ev["left_after"]) == (2, sums[1], ["2"])


def test_no_traceback_at_exit_after_loading_saving_and_failing(child):
    root, p, ev = child
    assert p.returncode == 0, p.stderr[-3000:]
    assert ev["failed_loads"] == 6
    for bad in ("Traceback", "Event loop is closed", "Exception ignored", "ERROR"):
        assert bad not in p.stderr, p.stderr[-3000:]
