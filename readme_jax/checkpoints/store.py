"""Model checkpoints on disk: orbax for arrays, JSON for what describes them.

A model directory holds `params/` (orbax), `model.json` (kind, configs, provenance) and, for MoE
models, `experts/` (the expert construction, see refactor/experts.py). `model.json` is written
last, so a directory without it is an incomplete save and is refused.

Content integrity: `manifest.json` (written just before model.json) records the size and sha256
of every other file of the directory. `load_params` verifies them first (`verify_files`), so a
damaged byte is a CheckpointError naming the file, not silently different weights (orbax and
TensorStore do not check content). A file whose identity (size, mtime_ns, inode) matches an
earlier successful check is not hashed again: the per-directory record lives under
$READMEJAX_CACHE_DIR/verified (default ~/.cache/readme_jax; "off": hash every time). Damage that
keeps a file's size and mtime is therefore caught only on a fresh cache. READMEJAX_VERIFY=0, or
verify=False, skips the check; a directory saved before manifests loads with one warning line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np

from readme_jax import cache_dir
from readme_jax.checkpoints.errors import CheckpointError

MODEL_JSON = "model.json"
MANIFEST = "manifest.json"
_CHUNK = 16 << 20  # bytes hashed per read
log = logging.getLogger(__name__)


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
    _write_json_atomic(path / MANIFEST, manifest(path))
    _write_json_atomic(path / MODEL_JSON, meta)
    return path


def _sha256(f: Path) -> str:
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(path: Path) -> list[Path]:
    skip = {MODEL_JSON, MANIFEST}
    return sorted(f for f in path.rglob("*") if f.is_file() and f.relative_to(path).as_posix()
                  not in skip and not f.name.endswith(".tmp"))  # fmt: skip


def manifest(path: str | Path) -> dict[str, Any]:
    """{"algorithm": "sha256", "files": {relative path: {"size": bytes, "sha256": hex}}} of
    every file under `path` but model.json and manifest.json."""
    path = Path(path)
    files = {
        f.relative_to(path).as_posix(): {"size": f.stat().st_size, "sha256": _sha256(f)}
        for f in _files(path)
    }
    return {"algorithm": "sha256", "files": files}


def _verified_record(path: Path) -> Path | None:
    root = cache_dir.memo_root()
    if root is None:
        return None
    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32]
    return Path(root) / "verified" / f"{key}.json"


def verify_files(path: str | Path) -> bool:
    """Check every file `manifest.json` lists under `path` (size, then sha256; files already
    checked with the same size, mtime_ns and inode are skipped, see the module docstring).
    Returns False, after one warning line, for a directory without a manifest (saved before
    manifests: unverified). Raises CheckpointError naming the first file that is missing or
    differs."""
    path = Path(path)
    mf = path / MANIFEST
    if not mf.exists():
        log.warning(
            "%s has no %s (saved before checksums): its content is unverified", path, MANIFEST
        )
        return False
    try:
        files = json.loads(mf.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{mf} is corrupt: {e}") from e
    rec = _verified_record(path)
    try:
        seen = json.loads(rec.read_text()) if rec is not None and rec.is_file() else {}
    except (OSError, ValueError):  # a torn or foreign record: check everything again
        seen = {}
    now = {}
    for rel, want in files.items():
        f = path / rel
        if not f.is_file():
            raise CheckpointError(
                f"{f}: listed in {MANIFEST} but missing; re-create the checkpoint"
            )
        st = f.stat()
        ident = [st.st_size, st.st_mtime_ns, st.st_ino, want["sha256"]]
        if seen.get(rel) != ident:
            if st.st_size != want["size"] or _sha256(f) != want["sha256"]:
                raise CheckpointError(
                    f"{f}: content differs from its checksum in {MANIFEST} (damaged or changed "
                    "since it was saved); re-create the checkpoint (re-run the stage that wrote it)"
                )
        now[rel] = ident
    if rec is not None and now != seen:
        try:  # best effort: a cache that cannot be written only costs the next load a re-hash
            rec.parent.mkdir(parents=True, exist_ok=True)
            _write_json_atomic(rec, now)
        except OSError:
            pass
    return True


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


def load_params(path: str | Path, abstract: Any | None = None, verify: bool | None = None) -> Any:
    """Restore params; with `abstract` (a tree of ShapeDtypeStruct), shapes are checked. Every
    file of the directory is first checked against manifest.json (`verify_files`) unless
    `verify` is False (None: unless READMEJAX_VERIFY=0). Raises CheckpointError."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    if not (path / "params").exists():
        raise CheckpointError(f"{path} has no params/ directory")
    if verify if verify is not None else os.environ.get("READMEJAX_VERIFY", "1") != "0":
        verify_files(path)
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
