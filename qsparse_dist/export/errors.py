"""Errors raised by export, consolidation and the runtime.  Each message says what is wrong and what
to do; the CLI prints it without a traceback and exits with status 2."""

from __future__ import annotations

__all__ = ["ExportError", "CheckpointError", "UnsupportedExportError"]


class ExportError(ValueError):
    """An export or model-loading problem (bad argument, bad directory)."""


class CheckpointError(ExportError):
    """A checkpoint that is missing, incomplete, corrupt or does not match its own config."""


class UnsupportedExportError(ExportError):
    """A format × model pair that cannot be exported faithfully (the message gives the reason)."""
