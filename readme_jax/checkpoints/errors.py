"""Errors raised at the checkpoint-loading boundary."""


class CheckpointError(ValueError):
    """A checkpoint file that is missing, truncated, corrupt or inconsistent with its config."""
