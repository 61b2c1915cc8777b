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
Train-state checkpoints (train/checkpoint.py) carry the same manifest in each step directory.

Writing holds the model once: `save_model` writes the arrays one at a time, each one storage
chunk (at most WRITE_PIECE bytes) at a time, straight from the caller's arrays (NumPy, memory-mapped
files or jax.Array), into a standard orbax checkpoint (`_PiecewiseArrays`; orbax's own handlers
copy every NumPy array, or move every jax.Array to the host, before writing).

Writing: `check_space` refuses a save that does not fit on its file system before anything is
written (arrays' bytes + SPACE_MARGIN), and `writing` turns an error of orbax's (async) writer,
e.g. a full disk, into one CheckpointError and removes orbax's half-written temporary directory.

Clean exit: `orbax()` imports orbax.checkpoint with its event-loop runner fixed (`_settle_loops`),
so a failed read or write no longer leaves TensorStore operations that call into a closed loop
("RuntimeError: Event loop is closed" tracebacks, dozens of them, at exit).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import itertools
import json
import logging
import os
import shutil
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np

import readme_jax.cache_dir as cache_dir
from readme_jax.checkpoints.errors import CheckpointError

MODEL_JSON = "model.json"
MANIFEST = "manifest.json"
_CHUNK = 16 << 20  # bytes hashed per read
SPACE_MARGIN = (0.05, 8 << 20)  # a save needs its arrays' bytes x (1 + 5%) + 8 MiB free
ORBAX_TMP = ".orbax-checkpoint-tmp"  # orbax writes `<name>.orbax-checkpoint-tmp*`, then renames
WRITE_PIECE = 16 << 20  # bytes: the largest piece of an array a save writes at once
_SETTLE_S = 60.0  # after a failed orbax call, how long its other operations may take to end
log = logging.getLogger(__name__)


def orbax() -> Any:
    """orbax.checkpoint, with `_settle_loops` applied (import it through here)."""
    import orbax.checkpoint as ocp

    _settle_loops()
    return ocp


def _settle_loops() -> None:
    """Make orbax end its event loops cleanly after a failure.

    orbax runs each synchronous call (save, restore, metadata) in a fresh asyncio loop
    (`asyncio_utils._run_sync_via_new_loop`) and closes the loop as soon as the call returns.
    When one TensorStore read or write fails, `asyncio.gather` raises at once while the others
    are still in flight; each of them, finishing later on a TensorStore thread, calls
    `loop.call_soon_threadsafe` on the closed loop and prints "RuntimeError: Event loop is
    closed" (18-36 tracebacks for a damaged tiny model), at exit or at any later point, burying
    the real error. This replaces that runner with one that, after a failure only, waits for the
    loop's remaining tasks (up to _SETTLE_S, then cancels them) and then leaves the loop open
    but stopped (kept in _FAILED_LOOPS) instead of closing it: TensorStore operations whose
    awaiting task has already ended can still call into it, harmlessly. Each failed orbax call
    so keeps one idle loop (a selector and a socket pair) until exit. The successful path is
    orbax's own. The branch for a caller inside a running loop (orbax's uvloop thread) is left
    as it is; nothing here loads a checkpoint from inside one."""
    from orbax.checkpoint._src import asyncio_utils

    if getattr(asyncio_utils, "_readme_settled", False):
        return
    if not hasattr(asyncio_utils, "_run_sync_via_new_loop"):  # another orbax: the exit test tells
        return

    def run(coro: Any) -> Any:
        loop = asyncio.new_event_loop()
        try:
            asyncio.set_event_loop(loop)
            result = loop.run_until_complete(coro)
        except BaseException:
            _finish_tasks(loop)
            _FAILED_LOOPS.append(loop)
            raise
        finally:
            asyncio.set_event_loop(None)
        loop.close()
        return result

    asyncio_utils._run_sync_via_new_loop = run
    asyncio_utils._readme_settled = True


_FAILED_LOOPS: list[asyncio.AbstractEventLoop] = []


def _finish_tasks(loop: asyncio.AbstractEventLoop) -> None:
    pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
    if not pending:
        return
    _, late = loop.run_until_complete(asyncio.wait(pending, timeout=_SETTLE_S))
    for t in late:
        t.cancel()
    if late:
        loop.run_until_complete(asyncio.gather(*late, return_exceptions=True))
    for t in pending:  # their errors are the failure already raised: retrieved, not logged
        if not t.cancelled():
            t.exception()


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def space_needed(nbytes: int) -> int:
    """Free bytes a save of arrays holding `nbytes` asks for (see SPACE_MARGIN)."""
    frac, fixed = SPACE_MARGIN
    return int(nbytes * (1 + frac)) + fixed


def check_space(
    directory: str | Path, nbytes: int, what: str, *, reclaim: int = 0, then: str = ""
) -> None:
    """Raise CheckpointError unless the file system of `directory` (or of its nearest existing
    parent) has room for `what` (arrays of `nbytes` bytes, see space_needed); `reclaim`: bytes
    the save frees before writing (an older copy it replaces). `then`: what the user should know
    next, appended to the message (e.g. that the previous checkpoint is intact)."""
    directory = Path(directory).absolute()
    probe = directory
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    need = space_needed(nbytes)
    if free + reclaim >= need:
        return
    have = _human(free) + (f" + {_human(reclaim)} it replaces" if reclaim else "")
    raise CheckpointError(
        f"not enough free disk space to save {what} in {directory}: it needs about "
        f"{_human(need)} ({_human(nbytes)} of arrays + margin), the file system has {have}; "
        f"nothing was written{then}"
    )


class _OrbaxReRaised(logging.Filter):
    """Drops orbax's ERROR records for a failure that it also raises to the caller (its
    background threads log each one with a traceback before handing it on)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in (record.pathname or "")
        )


def _join_writers() -> None:
    """Wait (up to _SETTLE_S in all) for orbax's writer threads: after one of them fails, orbax
    raises at once while the others still write into its temporary directory and log."""
    from orbax.checkpoint._src.futures import future

    cls = getattr(future, "_SignalingThread", None)
    if cls is None:
        return
    deadline = time.monotonic() + _SETTLE_S
    for t in threading.enumerate():
        if isinstance(t, cls) and t is not threading.current_thread():
            # threading.Thread.join: orbax's own join re-raises the thread's error
            threading.Thread.join(t, max(0.0, deadline - time.monotonic()))


@contextlib.contextmanager
def writing(what: str, where: Path, tmp_glob: str, *, then: str = "") -> Iterator[None]:
    """An error raised by the orbax save in the block becomes one CheckpointError naming `what`,
    `where` and orbax's reason (e.g. "No space left on device"); orbax's temporary directories
    matching `where.parent.glob(tmp_glob)` are removed (they hold the half-written save). Its
    own ERROR log lines for that error (tracebacks from its writer threads) are dropped."""
    absl_log = logging.getLogger("absl")
    drop = _OrbaxReRaised()
    absl_log.addFilter(drop)
    try:
        yield
    except CheckpointError:
        raise
    except Exception as e:
        _join_writers()  # the other writers of this save may still be running: let them end
        for tmp in where.parent.glob(tmp_glob):
            shutil.rmtree(tmp, ignore_errors=True)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(
            f"could not write {what} to {where} ({type(e).__name__}: {reason}); the partial "
            f"files were removed{then}"
        ) from e
    finally:
        absl_log.removeFilter(drop)


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def save_model(path: str | Path, params: Any, meta: dict[str, Any]) -> Path:
    """Save params (any pytree of arrays) and metadata. Overwrites an existing save. Raises
    CheckpointError, before writing anything, when the file system has no room for it
    (`check_space`), and when orbax fails to write it (`writing`): the directory is then an
    interrupted save, refused at load until the stage that writes it runs again."""
    ocp = orbax()
    path = Path(path).absolute()
    check_space(path, tree_nbytes(params), "the model", reclaim=dir_bytes(path / "params"))
    path.mkdir(parents=True, exist_ok=True)
    (path / MODEL_JSON).unlink(missing_ok=True)  # mark incomplete while writing
    (path / MANIFEST).unlink(missing_ok=True)  # describes the save being replaced
    if (path / "params").exists():
        shutil.rmtree(path / "params")
    # multi-process runs save from one process (train/distributed.py): no barrier with the others
    me = jax.process_index()
    mp = ocp.options.MultiprocessingOptions()
    if jax.process_count() > 1:
        mp = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    handler = ocp.PyTreeCheckpointHandler(
        multiprocessing_options=mp, type_handler_registry=_piecewise_registry()
    )
    ck = ocp.Checkpointer(handler, multiprocessing_options=mp)
    pieces = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=WRITE_PIECE), params)
    then = "; the directory is an interrupted save: free space, then re-run the stage"
    try:
        with writing("the model's parameters", path / "params", f"params{ORBAX_TMP}*", then=then):
            ck.save(path / "params", args=ocp.args.PyTreeSave(params, save_args=pieces))
    finally:
        ck.close()
    write_manifest(path)
    _write_json_atomic(path / MODEL_JSON, meta)
    return path


@functools.cache
def _piecewise_registry() -> Any:
    """orbax's type handlers with every array (NumPy or jax.Array) written by `_PiecewiseArrays`."""
    ocp = orbax()
    th = ocp.type_handlers
    arrays = _piecewise_arrays_class(th.NumpyHandler)()
    scalar = th.ScalarHandler()
    return th.create_type_handler_registry(
        (int, scalar),
        (float, scalar),
        (np.number, scalar),
        (np.ndarray, arrays),
        (jax.Array, arrays),
        (str, th.StringHandler()),
    )


def _piecewise_arrays_class(numpy_handler: type) -> type:
    import tensorstore as ts

    class _PiecewiseArrays(numpy_handler):
        """orbax's NumPy handler (the same files: zarr arrays in OCDBT, read back by any
        StandardCheckpointer) writing the arrays one at a time, each one storage chunk at a
        time (chunks of at most WRITE_PIECE bytes: SaveArgs.chunk_byte_size), straight from
        the caller's arrays. orbax's own handlers copy every NumPy leaf before writing and move
        every jax.Array to the host at once: a second copy of the model. Here the save holds
        one chunk beyond the caller's arrays (a jax.Array is viewed on the host, which on CPU
        is no copy; on an accelerator one leaf is copied at a time)."""

        def __init__(self):
            super().__init__(deepcopy_host_arrays=False)  # the save is synchronous
            # the per-array sharding records of orbax's jax.Array handler: none for host arrays
            self._array_metadata_store = None
            self._turns: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

        async def _open_and_write(self, value: Any, tspec: dict, ts_context: Any) -> None:
            turn = self._turns.setdefault(asyncio.get_running_loop(), asyncio.Lock())
            async with turn:  # orbax gathers every array's write at once: one at a time
                t = await ts.open(ts.Spec(tspec), create=True, open=True, context=ts_context)
                host = np.asarray(value)
                for box in _chunk_boxes(host.shape, t.chunk_layout.write_chunk.shape):
                    await t[box].write(host[box])  # each chunk committed before the next

        async def deserialize(self, infos, args=None):
            """The arrays read one at a time, each one storage chunk at a time, into a buffer
            aligned for XLA (`aligned_empty`), which a CPU device then uses without a copy
            (`jax.device_put` aliases aligned host memory): a load holds the model once plus
            one chunk, where orbax's reader returns unaligned arrays that every device_put
            copies (the model plus its largest leaf). Falls back to orbax's reader for the
            reads it builds differently (e.g. a dtype cast)."""
            from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

            args = args or [None] * len(infos)
            if any(a is not None and getattr(a, "dtype", None) is not None for a in args):
                return await super().deserialize(infos, args)
            out = []
            for info in infos:
                await info.await_path_creation()
                spec = ts_utils.build_array_read_spec(
                    info,
                    use_ocdbt=info.is_ocdbt_checkpoint,
                    metadata_key=self._metadata_key,
                    raise_array_data_missing_error=info.raise_array_data_missing_error,
                )
                t = await ts.open(ts.Spec(spec.json), open=True, context=info.ts_context)
                host = aligned_empty(tuple(t.shape), t.dtype.numpy_dtype)
                for box in _chunk_boxes(host.shape, t.chunk_layout.read_chunk.shape):
                    host[box] = await t[box].read()
                out.append(host)
            return out

    return _PiecewiseArrays


# XLA:CPU uses a host buffer in place when it is aligned to this many bytes
XLA_ALIGN = 64


def aligned_empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """An uninitialised array whose data starts on an XLA_ALIGN-byte boundary (NumPy's own
    allocations are 16-byte aligned, which makes every `jax.device_put` on CPU a copy)."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(n + XLA_ALIGN, np.uint8)
    off = (-raw.ctypes.data) % XLA_ALIGN
    return raw[off : off + n].view(dtype).reshape(shape)


def _chunk_boxes(shape: tuple[int, ...], chunk: tuple[int, ...]) -> Iterator[tuple[slice, ...]]:
    """The index boxes of a regular chunk grid over `shape`, in C order."""
    starts = [range(0, n, c) for n, c in zip(shape, chunk, strict=True)]
    for corner in itertools.product(*starts):
        yield tuple(slice(i, min(i + c, n)) for i, c, n in zip(corner, chunk, shape, strict=True))


def write_manifest(path: str | Path) -> None:
    """Write `path`/manifest.json (see `manifest`) atomically."""
    _write_json_atomic(Path(path) / MANIFEST, manifest(path))


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


def verify_files(path: str | Path, remember: bool = True) -> bool:
    """Check every file `manifest.json` lists under `path` (size, then sha256; files already
    checked with the same size, mtime_ns and inode are skipped, see the module docstring;
    remember=False neither reads nor writes that record: everything is hashed).
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
    rec = _verified_record(path) if remember else None
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
    ocp = orbax()

    path = Path(path).absolute()
    if not (path / "params").exists():
        raise CheckpointError(f"{path} has no params/ directory")
    if verify if verify is not None else os.environ.get("READMEJAX_VERIFY", "1") != "0":
        verify_files(path)
    multi = jax.process_count() > 1
    if multi:
        ck = ocp.StandardCheckpointer()
    else:  # NumPy leaves read chunk by chunk into aligned buffers (`_PiecewiseArrays`)
        handler = ocp.PyTreeCheckpointHandler(type_handler_registry=_piecewise_registry())
        ck = ocp.Checkpointer(handler)
    try:
        # multi-process: the saving process's devices may not be ours; each restores a copy
        if multi:
            restored = ck.restore(path / "params", _local_target(ck, path / "params"))
        else:
            restored = ck.restore(path / "params")
    except Exception as e:
        raise CheckpointError(
            f"could not restore {path / 'params'}: {type(e).__name__}: {e}"
        ) from e
    finally:
        ck.close()
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
    # takes them copies them in again. One leaf at a time, each host copy dropped as soon as it
    # is on device: the model is held once plus one leaf, not twice (on CPU, aligned leaves are
    # used in place: once).
    leaves, treedef = jax.tree.flatten(restored)
    del restored
    for i in range(len(leaves)):
        leaves[i] = jax.device_put(leaves[i])
    return jax.tree.unflatten(treedef, leaves)


def tree_nbytes(tree: Any) -> int:
    return int(sum(np.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(tree)))
