"""The one cache directory of the project: data (downloads, corpora, tokens, tasks) and the
memo caches (parsed tokenizers, checkpoint verification records) all live under it.

`$READMEJAX_CACHE_DIR`, else `$XDG_CACHE_HOME/readme_jax`, else `~/.cache/readme_jax`.
`READMEJAX_CACHE_DIR=off` turns the memo caches off (every tokenizer parsed, every checkpoint
hashed); data still needs a home and goes to the default directory. The old data variable
`READEME_CACHE` still works, with one deprecation line on stderr. Imports nothing of the project,
so every package may use it.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

ENV = "READMEJAX_CACHE_DIR"
OLD_ENV = "READEME_CACHE"


@functools.cache
def _deprecated(old: str, new: str | None) -> None:
    note = f" (ignored: {ENV} is set)" if new else ""
    print(f"warning: {OLD_ENV} is deprecated, use {ENV}{note}", file=sys.stderr)


def default_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "readme_jax"


def cache_root() -> Path:
    """The cache directory (see the module docstring); never None."""
    new, old = os.environ.get(ENV), os.environ.get(OLD_ENV)
    if old:
        _deprecated(old, new)
    if new and new != "off":
        return Path(new).expanduser()
    if old and not new:
        return Path(old).expanduser()
    return default_root()


def memo_root() -> Path | None:
    """Where memo caches go: the cache directory, or None when `READMEJAX_CACHE_DIR=off`."""
    if os.environ.get(ENV) == "off":
        return None
    return cache_root()
