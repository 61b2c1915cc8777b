"""Train-state checkpoints: orbax CheckpointManager with params, optimizer state and a JSON
record of where the run is (round, phase, step in phase, global step, grain iterator state).

Orbax writes each step into a temporary directory and renames it when complete, so a crash
mid-save leaves the previous checkpoints intact. `restore_latest` walks back from the newest
step and skips (with a warning) any that fails to restore.

Multi-process runs: every process calls save and restore with its global arrays (orbax's
multi-host path: each writes its own shards, process 0 the metadata and the JSON record), so the
directory must be one that all processes see. The JSON record is written once, so it must be
the same on every process (checked at each save).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

import readme_jax.train.distributed as dist


class TrainCheckpoints:
    def __init__(self, directory: str | Path, keep: int = 3):
        self.dir = Path(directory).absolute()
        opts = ocp.CheckpointManagerOptions(
            max_to_keep=max(2, keep), enable_async_checkpointing=False, create=True
        )
        self.mgr = ocp.CheckpointManager(self.dir, options=opts)

    def steps(self) -> list[int]:
        return sorted(self.mgr.all_steps())

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        dist.assert_same(meta, f"the checkpoint record of step {step}")
        if step in self.mgr.all_steps():  # a step redone after a fallback: replace it
            self.mgr.delete(step)
        self.mgr.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )
        self.mgr.wait_until_finished()

    def restore_latest(
        self, abstract_for: Callable[[dict[str, Any]], Any]
    ) -> tuple[int, Any, dict[str, Any]] | None:
        """(step, state, meta) of the newest checkpoint that restores, or None if there is none.

        abstract_for(meta) gives the state's ShapeDtypeStruct tree (with shardings): the
        optimizer state's structure depends on the phase recorded in meta."""
        for step in reversed(self.steps()):
            try:
                meta = self.mgr.restore(
                    step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
                ).meta
                abstract = abstract_for(meta)
                state = self.mgr.restore(
                    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
                ).state
                jax.block_until_ready(state)
                return step, state, meta
            except Exception as e:  # a damaged or partial checkpoint: fall back to the previous
                warnings.warn(
                    f"checkpoint {self.dir / str(step)} could not be restored "
                    f"({type(e).__name__}: {str(e)[:200]}); falling back to the previous one",
                    stacklevel=2,
                )
        return None

    def close(self) -> None:
        self.mgr.close()
