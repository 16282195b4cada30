"""Errors raised for bad user input; each message is one line naming the thing and where it is."""

from r1jax.config import ConfigError


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or does not fit the model; the message names it."""


class CheckpointDamaged(CheckpointError):
    """A checkpoint whose files are not what was written (truncated, changed, missing, unreadable);
    the message names the checkpoint (run step or params directory) and the first damaged file."""


class DataError(ValueError):
    """A dataset that is missing or malformed; the message names the file and line."""


__all__ = ["CheckpointDamaged", "CheckpointError", "ConfigError", "DataError"]
