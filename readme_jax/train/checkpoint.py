"""Train-state checkpoints: orbax CheckpointManager with params, optimizer state and a JSON
record of where the run is (round, phase, step in phase, global step, grain iterator state).

Orbax writes each step into a temporary directory and renames it when complete, so a crash
mid-save leaves the previous checkpoints intact. `restore_latest` walks back from the newest
step and skips (with a warning naming why) any that fails to restore; when none restores it
raises CheckpointError rather than start the run again from its first step.

The last `keep` steps stay on disk (train.keep, >= 1): orbax deletes the oldest only after the
new one is complete, so even keep=1 never leaves a moment without a complete checkpoint; what
keep=1 gives up is the fallback when that one checkpoint is damaged.

Content integrity: each step directory gets `manifest.json` (size and sha256 of every file,
checkpoints/store.py, written once orbax has finalized the step), verified before the step is
restored; damaged bytes are a CheckpointError naming the file. A step saved before manifests
(or cut off between orbax's rename and the manifest) restores with one "unverified" warning.

Disk: before each save, the free space of the directory's file system is checked against the
state's bytes plus a margin (store.check_space), and an error of orbax's writer (a full disk)
becomes one CheckpointError; either way the earlier checkpoints are intact and the run resumes
from the newest of them once space is freed (--config.resume=True).

Multi-process runs: every process calls save and restore with its global arrays (orbax's
multi-host path: each writes its own shards, process 0 the metadata, the JSON record and the
manifest), so the directory must be one that all processes see. The JSON record is written once,
so it must be the same on every process (checked at each save).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

import readme_jax.train.distributed as dist
from readme_jax.checkpoints import store
from readme_jax.checkpoints.errors import CheckpointError

ocp = store.orbax()


class TrainCheckpoints:
    def __init__(self, directory: str | Path, keep: int = 3):
        if keep < 1:
            raise CheckpointError(f"train.keep={keep} is out of range: allowed >= 1")
        self.dir = Path(directory).absolute()
        opts = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=False,
            create=True,
            cleanup_tmp_directories=True,  # what a killed save left behind
        )
        self.mgr = ocp.CheckpointManager(self.dir, options=opts)

    def steps(self) -> list[int]:
        return sorted(self.mgr.all_steps())

    def _intact(self) -> str:
        done = self.steps()
        if not done:
            return "; no earlier train-state checkpoint exists, a rerun starts from the beginning"
        return (
            f"; the last checkpoint ({self.dir / str(done[-1])}) is intact: free space, then "
            "rerun with --config.resume=True to continue from it"
        )

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Save `state` and `meta` as `step`. Raises CheckpointError, leaving the earlier steps
        as they were, when the disk has no room for it or the write fails."""
        dist.assert_same(meta, f"the checkpoint record of step {step}")
        what = f"train-state checkpoint step {step}"
        replaced = self.dir / str(step) if step in self.mgr.all_steps() else None
        reclaim = store.dir_bytes(replaced) if replaced else 0
        store.check_space(self.dir, store.tree_nbytes(state), what, reclaim=reclaim,
                          then=self._intact())  # fmt: skip
        if replaced:  # a step redone after a fallback: replace it
            self.mgr.delete(step)
        with store.writing(what, self.dir / str(step), f"{step}{store.ORBAX_TMP}*",
                           then=self._intact()):  # fmt: skip
            self.mgr.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
                ),
                force=True,
            )
            self.mgr.wait_until_finished()
        if dist.is_primary():
            store.write_manifest(self.dir / str(step))

    def restore_latest(
        self, abstract_for: Callable[[dict[str, Any]], Any]
    ) -> tuple[int, Any, dict[str, Any]] | None:
        """(step, state, meta) of the newest checkpoint that restores, or None if there is none.
        Raises CheckpointError when there are checkpoints but none restores (each one's reason
        was given in a warning).

        abstract_for(meta) gives the state's ShapeDtypeStruct tree (with shardings): the
        optimizer state's structure depends on the phase recorded in meta."""
        failed = []
        steps = self.steps()
        for i, step in reversed(list(enumerate(steps))):
            try:
                return step, *self._restore(step, abstract_for)
            except Exception as e:  # a damaged or partial checkpoint: fall back to the previous
                why = f"{type(e).__name__}: {str(e)[:400]}"
                failed.append(why)
                then = "falling back to the previous one" if i else "no earlier one is left"
                warnings.warn(
                    f"checkpoint {self.dir / str(step)} could not be restored ({why}); {then}",
                    stacklevel=2,
                )
        if failed:
            raise CheckpointError(
                f"none of the {len(failed)} train-state checkpoints in {self.dir} restores "
                f"(the newest: {failed[0]}); remove {self.dir.parent} to train this model from "
                "its first step"
            )
        return None

    def _restore(self, step: int, abstract_for: Callable[[dict[str, Any]], Any]):
        """(state, meta) of `step`, its files checked against the manifest first."""
        store.verify_files(self.dir / str(step), remember=False)
        meta = self.mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_for(meta)))
        return jax.block_until_ready(self.mgr.restore(step, args=args).state), meta

    def restore_step(self, step: int, abstract_for: Callable[[dict[str, Any]], Any]) -> Any:
        """The state saved as `step` (abstract_for as in restore_latest). Raises
        CheckpointError when the step is not kept or does not restore."""
        if step not in self.steps():
            raise CheckpointError(
                f"no train-state checkpoint of step {step} in {self.dir} (kept: {self.steps()})"
            )
        try:
            return self._restore(step, abstract_for)[0]
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(
                f"train-state checkpoint {self.dir / str(step)} does not restore "
                f"({type(e).__name__}: {str(e)[:400]})"
            ) from e

    def close(self) -> None:
        self.mgr.close()
