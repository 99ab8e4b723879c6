"""Errors meant for people.

Every mistake a user can make (a bad config value, a missing file, a token id out of range)
raises a subclass of :class:`QkvError` with one sentence that names the problem. The command line
prints that sentence and exits with status 2. Any other exception is a bug in qkv.
"""

from __future__ import annotations


class QkvError(Exception):
    """Base class of every error qkv raises on purpose."""


class ConfigError(QkvError, ValueError):
    """A configuration value is missing, of the wrong type, or inconsistent with another."""


class PrecisionError(ConfigError):
    """A number format (precision) the device cannot compute, such as bf16 on Apple's mps."""


class CheckpointError(QkvError):
    """A model directory or weights file is missing, corrupt, or does not match its config."""


class InputError(QkvError, ValueError):
    """Input data is unusable: token ids out of range, a sequence too long, empty or binary text."""


class TokenizerError(QkvError):
    """A tokenizer cannot be trained, loaded or used as asked."""


class UnsupportedModelError(CheckpointError):
    """A checkpoint uses an architecture or feature qkv does not implement."""
