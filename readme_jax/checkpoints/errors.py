"""Errors raised at the checkpoint-loading boundary (launch scripts report them via cli.py)."""

from readme_jax.errors import UserError


class CheckpointError(UserError, ValueError):
    """A checkpoint file that is missing, truncated, corrupt or inconsistent with its config, or
    one that cannot be written (no room on the disk, an I/O error while writing)."""


class TextError(UserError, ValueError):
    """Text that cannot be tokenized (e.g. not valid UTF-8), or a chat the model cannot format."""
