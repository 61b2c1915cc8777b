"""Model checkpoints on disk: orbax for arrays, JSON for what describes them.

A model directory holds `params/` (orbax), `model.json` (kind, configs, provenance) and, for MoE
models, `experts/` (the expert construction, see refactor/experts.py). `model.json` is written
last, so a directory without it is an incomplete save and is refused.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np

from readme_jax.checkpoints.errors import CheckpointError

MODEL_JSON = "model.json"


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def save_model(path: str | Path, params: Any, meta: dict[str, Any]) -> Path:
    """Save params (any pytree of arrays) and metadata. Overwrites an existing save."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    path.mkdir(parents=True, exist_ok=True)
    (path / MODEL_JSON).unlink(missing_ok=True)  # mark incomplete while writing
    if (path / "params").exists():
        shutil.rmtree(path / "params")
    # multi-process runs save from one process (train/distributed.py): no barrier with the others
    me = jax.process_index()
    mp = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    ck = (
        ocp.StandardCheckpointer(multiprocessing_options=mp)
        if jax.process_count() > 1
        else (ocp.StandardCheckpointer())
    )
    ck.save(path / "params", params)
    ck.wait_until_finished()
    _write_json_atomic(path / MODEL_JSON, meta)
    return path


def read_meta(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint directory not found: {path}")
    mj = path / MODEL_JSON
    if not mj.exists():
        raise CheckpointError(
            f"{path} has no {MODEL_JSON}: not a readme_jax model, or an interrupted save "
            "(re-run the stage that writes it)"
        )
    try:
        return json.loads(mj.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{mj} is corrupt: {e}") from e


def _local_target(ck: Any, path: Path) -> Any:
    """The saved tree as ShapeDtypeStructs on this process's first device."""
    meta = ck.metadata(path).item_metadata
    tree = getattr(meta, "tree", meta)
    dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev), tree)


def load_params(path: str | Path, abstract: Any | None = None) -> Any:
    """Restore params; with `abstract` (a tree of ShapeDtypeStruct), shapes are checked."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    if not (path / "params").exists():
        raise CheckpointError(f"{path} has no params/ directory")
    ck = ocp.StandardCheckpointer()
    try:
        # multi-process: the saving process's devices may not be ours; each restores a copy
        target = _local_target(ck, path / "params") if jax.process_count() > 1 else None
        restored = ck.restore(path / "params", target)
    except Exception as e:
        raise CheckpointError(
            f"could not restore {path / 'params'}: {type(e).__name__}: {e}"
        ) from e
    if abstract is not None:
        want = dict(jax.tree_util.tree_flatten_with_path(abstract)[0])
        have = dict(jax.tree_util.tree_flatten_with_path(restored)[0])
        for k, v in want.items():
            if k not in have:
                raise CheckpointError(f"{path}: parameter {jax.tree_util.keystr(k)} is missing")
            if tuple(have[k].shape) != tuple(v.shape):
                raise CheckpointError(
                    f"{path}: parameter {jax.tree_util.keystr(k)} has shape "
                    f"{tuple(have[k].shape)}, the config implies {tuple(v.shape)}"
                )
    # orbax restores NumPy arrays without a target; on device once, or every jitted call that
    # takes them copies them in again
    return jax.device_put(restored)


def tree_nbytes(tree: Any) -> int:
    return int(sum(np.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(tree)))
