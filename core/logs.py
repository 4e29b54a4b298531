"""Structured logs: each record's ``extra`` fields (client_order_id, symbol, date, bar, ...)
appended as ``key=value`` (or one JSON object per line with ``TRADING_LOG_FORMAT=json``), and
every secret the settings hold masked wherever it would appear.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import Any

# attributes every LogRecord has: anything else on a record came from ``extra=``
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName"}
MASK = "***"


def secret_values(settings: Any) -> list[str]:
    """The settings' secret values (SecretStr fields), longest first, 4 characters at least."""
    out = []
    for name in type(settings).model_fields:
        value = getattr(settings, name, None)
        getter = getattr(value, "get_secret_value", None)
        if getter is not None:
            secret = getter()
            if secret and len(secret) >= 4:
                out.append(secret)
    for url_name in ("redis_url",):  # a password inside a URL
        url = getattr(settings, url_name, "") or ""
        if "@" in url and ":" in url.split("@")[0].split("//")[-1]:
            out.append(url.split("@")[0].split("//")[-1].split(":", 1)[1])
    return sorted(set(out), key=len, reverse=True)


class StructuredFormatter(logging.Formatter):
    """``time level logger: message key=value ...`` or a JSON object, secrets masked."""

    def __init__(self, secrets: Iterable[str] = (), as_json: bool = False,
                 fmt: str = "%(asctime)s %(levelname)s %(name)s: %(message)s") -> None:
        super().__init__(fmt)
        self._secrets = [s for s in secrets if s]
        self._json = as_json

    def _mask(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        return text

    def format(self, record: logging.LogRecord) -> str:
        extras = {k: v for k, v in vars(record).items()
                  if k not in _STANDARD and not k.startswith("_")}
        if self._json:
            doc = {"time": self.formatTime(record), "level": record.levelname,
                   "logger": record.name, "message": record.getMessage(), **{
                       k: v if isinstance(v, int | float | bool) or v is None else str(v)
                       for k, v in extras.items()}}
            if record.exc_info:
                doc["exc"] = self.formatException(record.exc_info)
            return self._mask(json.dumps(doc, default=str))
        line = super().format(record)
        if extras:
            line += " " + " ".join(f"{k}={v}" for k, v in sorted(extras.items()))
        return self._mask(line)


def install(settings: Any, logger: logging.Logger | None = None) -> None:
    """Put the structured, masking formatter on every handler of ``logger`` (root)."""
    target = logger or logging.getLogger()
    fmt = StructuredFormatter(secret_values(settings),
                              as_json=getattr(settings, "log_format", "text") == "json")
    for handler in target.handlers:
        handler.setFormatter(fmt)
