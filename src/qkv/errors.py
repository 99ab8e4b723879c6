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


class CheckpointError(QkvError):
    """A model directory or weights file is missing, corrupt, or does not match its config."""


class InputError(QkvError, ValueError):
    """Input data is unusable: token ids out of range, a sequence too long, empty or binary text."""


class PrecisionError(ConfigError, InputError):
    """A number format (precision) that qkv does not know, or that the device cannot compute
    (bf16 on Apple's mps). A setting of a run (ConfigError) as much as an argument of a call
    (InputError): code that catches either one sees it."""


class TokenizerError(QkvError):
    """A tokenizer cannot be trained, loaded or used as asked."""


class UnsupportedModelError(CheckpointError):
    """A checkpoint uses an architecture or feature qkv does not implement."""


class StorageError(QkvError, OSError):
    """The filesystem refused: no space left, no permission, a read-only disk, a file where a
    folder should be. (Also an OSError, so code that catches OSError still sees it.)"""
