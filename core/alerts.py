"""Optional alerts to a chat webhook (Slack or Discord style JSON), rate-limited across all
processes through Redis.

Off unless ``TRADING_ALERT_WEBHOOK_URL`` is set. Sent on fills, the end-of-day result,
halts (kill switch, daily loss limit), circuit-breaker trips and errors that need a person.
At most ``ALERT_MAX_PER_MINUTE`` alerts a minute go out (the rest are counted and logged);
posting happens on a daemon thread with a short timeout, so trading never waits on it.
Texts carry symbols and order ids, never secrets.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.request
from typing import Any

log = logging.getLogger(__name__)

KINDS = ("fill", "eod", "halt", "breaker", "error")


class Alerter:
    """Posts alerts to one webhook; a no-op without a URL."""

    def __init__(self, redis: Any, prefix: str, url: str | None, per_minute: int = 20,
                 timeout_s: float = 3.0) -> None:
        self._r = redis
        self._prefix = prefix
        self._url = url
        self._per_minute = per_minute
        self._timeout = timeout_s

    @property
    def enabled(self) -> bool:
        """True when a webhook is configured."""
        return bool(self._url)

    def send(self, kind: str, text: str, once_key: str | None = None) -> bool:
        """Queue one alert; False when off, a duplicate of ``once_key``, or over the rate."""
        if not self._url:
            return False
        try:
            if once_key is not None and not self._r.set(
                    f"{self._prefix}alerts:once:{once_key}", "1", nx=True, ex=3 * 24 * 3600):
                return False
            minute = int(time.time() // 60)
            key = f"{self._prefix}alerts:rate:{minute}"
            pipe = self._r.pipeline(transaction=False)
            pipe.incr(key)
            pipe.expire(key, 180)
            count = int(pipe.execute()[0])
        except Exception:  # alerts must never break trading
            log.exception("alert rate check failed")
            return False
        if count > self._per_minute:
            if count == self._per_minute + 1:
                log.warning("alert rate limit reached: further alerts this minute are dropped")
            return False
        body = json.dumps({"text": f"[daytrader {kind}] {text}",
                           "content": f"[daytrader {kind}] {text}"}).encode()
        threading.Thread(target=self._post, args=(body,), daemon=True).start()
        return True

    def _post(self, body: bytes) -> None:
        req = urllib.request.Request(self._url or "", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self._timeout) as resp:
                resp.read()
        except Exception as exc:  # a dead webhook is logged, never raised
            log.warning("alert webhook failed: %s", type(exc).__name__)
