"""The configuration error type (its own module so :mod:`.rules` and :mod:`.load` share it without a cycle)."""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A configuration problem; the message names the field(s)."""
