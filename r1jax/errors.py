"""Errors raised for bad user input; each message is one line naming the thing and where it is."""

from r1jax.config import ConfigError


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or does not fit the model; the message names it."""


class DataError(ValueError):
    """A dataset that is missing or malformed; the message names the file and line."""


__all__ = ["CheckpointError", "ConfigError", "DataError"]
