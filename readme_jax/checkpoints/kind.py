"""What a checkpoint path holds, decided by content (GGUF magic, marker files), not by its name."""

from __future__ import annotations

from pathlib import Path

from readme_jax.checkpoints.errors import CheckpointError
from readme_jax.checkpoints.gguf import is_gguf

GGUF, HF, README = "gguf", "hf", "readme"
_README_PARTS = ("params", "experts")  # what a readme_jax save writes before model.json


def checkpoint_kind(path: str | Path) -> str:
    """ "gguf" (a file starting with the GGUF magic), "readme" (a readme_jax model directory
    with model.json), or "hf" (any other directory).

    Raises CheckpointError for a missing path, a file that is not GGUF (with what it looks
    like), and a readme_jax directory whose save was interrupted (params/ without model.json).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_file():
        if is_gguf(path):
            return GGUF
        hint = (
            " (a safetensors file: pass the directory that holds it and its config.json)"
            if path.suffix == ".safetensors"
            else ""
        )
        raise CheckpointError(f"{path} is not a GGUF file (no GGUF magic){hint}")
    if (path / "model.json").exists():
        return README
    if any((path / p).exists() for p in _README_PARTS) and not (path / "config.json").exists():
        raise CheckpointError(
            f"{path} has {', '.join(p for p in _README_PARTS if (path / p).exists())}/ but no "
            "model.json: an interrupted readme_jax save; re-run the stage that writes it"
        )
    return HF
