"""Errors of the ML package (part of the ``core.errors`` hierarchy)."""

from __future__ import annotations

from core.errors import TradingError


class ModelError(TradingError):
    """A model version that cannot be served: missing or corrupted file, or features or
    format that do not match this code. Callers skip ML and trade on the rules alone; the
    ``daytrader`` command line exits with status 2."""
