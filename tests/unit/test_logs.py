"""Structured logs: extra fields shown, secrets masked (text and JSON)."""

from __future__ import annotations

import json
import logging

from core.config import Settings
from core.logs import MASK, StructuredFormatter, secret_values


def _record(msg: str, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("core.execution", logging.WARNING, __file__, 1, msg, None, None)
    for k, v in extra.items():
        setattr(rec, k, v)
    return rec


def test_extras_as_key_values_and_secrets_masked() -> None:
    settings = Settings(alpaca_api_key="PKSECRETKEY123", alpaca_secret_key="s3cr3t-value",
                        redis_url="redis://bot:redispass99@127.0.0.1:6379/0")
    secrets = secret_values(settings)
    assert {"PKSECRETKEY123", "s3cr3t-value", "redispass99"} <= set(secrets)
    fmt = StructuredFormatter(secrets)
    line = fmt.format(_record("order refused with key PKSECRETKEY123 at redispass99",
                              client_order_id="orb-AAPL-20240603-0945-L", symbol="AAPL"))
    assert "client_order_id=orb-AAPL-20240603-0945-L" in line and "symbol=AAPL" in line
    assert "PKSECRETKEY123" not in line and "redispass99" not in line and MASK in line


def test_json_lines() -> None:
    fmt = StructuredFormatter(["s3cr3t-value"], as_json=True)
    doc = json.loads(fmt.format(_record("x s3cr3t-value", symbol="MSFT", bar=12)))
    assert doc["symbol"] == "MSFT" and doc["bar"] == 12 and doc["level"] == "WARNING"
    assert "s3cr3t-value" not in json.dumps(doc)
