"""Exception types shared across clipkit, so callers can catch one family per failure kind."""
from __future__ import annotations


class ClipkitError(Exception):
    """Base class of every error clipkit raises on purpose."""


class ImageLoadError(ClipkitError):
    """An image could not be read; `reason` classifies it for skip counters."""

    def __init__(self, source: str, reason: str, detail: str = "") -> None:
        self.source = source
        self.reason = reason  # decode_error | unidentified | too_large | missing
        self.detail = detail
        msg = f"cannot load image {source}: {reason}"
        super().__init__(f"{msg} ({detail})" if detail else msg)


class CheckpointError(ClipkitError):
    """A checkpoint or model directory is missing, corrupt, or does not match the model."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint would need arbitrary code (pickle globals, TorchScript, remote code) to load."""


class DataError(ClipkitError):
    """A data table or folder is malformed (missing columns, bad rows, unreadable file)."""


class IndexLoadError(ClipkitError):
    """A saved search index is missing, corrupt, or does not match its manifest."""
