"""The PyTorch peer for the live parity tests (no tests here): which Python has torch and
transformers, and one peer process for a whole batch of models (tools/peer_logits.py), so a test
module pays the torch + transformers import once."""

from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


@functools.cache
def peer_python() -> str | None:
    """$READMEJAX_PEER_PYTHON, the repo's (or, in a linked worktree, the main checkout's)
    .venv-peer, or this Python when torch and transformers import in it; None when none does."""
    here = sys.executable if importlib.util.find_spec("torch") else None
    common = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--path-format=absolute", "--git-common-dir"],
        capture_output=True, text=True,
    )  # fmt: skip
    main = Path(common.stdout.strip()).parent if common.returncode == 0 else ROOT
    for cand in (os.environ.get("READMEJAX_PEER_PYTHON"), str(ROOT / ".venv-peer/bin/python"),
                 str(main / ".venv-peer/bin/python"), here):  # fmt: skip
        if cand and Path(cand).exists():
            ok = subprocess.run([cand, "-c", "import torch, transformers"], capture_output=True)
            if ok.returncode == 0:
                return cand
    return None


def peer_logits_many(jobs: list[tuple[Path, np.ndarray]], tmp: Path) -> list[np.ndarray]:
    """PyTorch float32 logits [B, S, V] for each (HF model directory, tokens [B, S]), from one
    peer process. Skips the calling test when no Python has torch (make peer)."""
    python = peer_python()
    if python is None:
        pytest.skip("no Python with torch + transformers (set READMEJAX_PEER_PYTHON; make peer)")
    argv, outs = [], []
    for i, (model_dir, tokens) in enumerate(jobs):
        np.save(tmp / f"tokens{i}.npy", tokens)
        argv += [str(model_dir), str(tmp / f"tokens{i}.npy"), str(tmp / f"logits{i}.npy")]
        outs.append(tmp / f"logits{i}.npy")
    cmd = [python, str(ROOT / "tools" / "peer_logits.py"), *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"peer failed:\n{proc.stderr[-3000:]}"
    return [np.load(o) for o in outs]
