"""Errors raised at the checkpoint-loading boundary, and how launch scripts report them."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from readme_jax.model.config import ConfigError


class CheckpointError(ValueError):
    """A checkpoint file that is missing, truncated, corrupt or inconsistent with its config."""


class TextError(ValueError):
    """Text that cannot be tokenized (e.g. not valid UTF-8), or a chat the model cannot format."""


@contextlib.contextmanager
def user_errors(*extra: type[BaseException]) -> Iterator[None]:
    """For launch scripts: a user error (bad checkpoint, config, text, or any of `extra`) ends
    the program with one line `error: ...` on stderr and exit status 1, not a traceback."""
    try:
        yield
    except (CheckpointError, ConfigError, TextError, FileNotFoundError, *extra) as e:
        sys.exit(f"error: {e}")
