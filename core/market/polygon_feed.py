"""Polygon.io minute bars: REST backfill and the ``AM`` (aggregates per minute) stream.

REST: ``RESTClient.list_aggs(sym, 1, "minute", from_ms, to_ms)`` (GET
``/v2/aggs/ticker/{sym}/range/1/minute/{from}/{to}``), which follows ``next_url`` pages.
Each result has ``t`` = the bar START in Unix ms (UTC) and ``o h l c v`` (plus ``vw n``).
Stream: ``WebSocketClient`` on ``<host>/stocks``, subscribed to ``AM.<sym>`` for the universe;
each event is ``{"ev":"AM","sym":..,"o":..,"h":..,"l":..,"c":..,"v":..,"s":start_ms,
"e":end_ms,...}``, sent after the minute ends and only when the symbol traded in it.

Version traps handled here (polygon-api-client 1.16): the REST client computes a timeout but
never passes it to urllib3 (a stalled server blocks forever), so the pool gets it; urllib3
retries 429/5xx itself (honouring Retry-After) and raises ``MaxRetryError`` when they run out;
the WebSocket client has no URL argument (``feed=host:port, secure=False`` gives ``ws://``),
returns quietly on a normal close and never notices a silent socket: the feed
(``core.market.feed.SessionFeed``) watches it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import inspect
import json
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlparse

from core.market.feed import (
    FeedConfig,
    FetchResult,
    MinuteAgg,
    StreamAuthError,
    StreamSession,
    StreamSink,
    backoff_delays,
    finite_number,
    to_ms,
)

log = logging.getLogger(__name__)

DEFAULT_REST_URL = "https://api.polygon.io"
DEFAULT_WS_URL = "wss://socket.polygon.io"
_PAGE_LIMIT = 50_000


# --- pure parsing ------------------------------------------------------------------------


def agg_from_event(event: dict) -> MinuteAgg:
    """A stream ``AM`` event as a MinuteAgg; raises KeyError/ValueError/TypeError if unusable."""
    return MinuteAgg(
        symbol=str(event["sym"]), start_ms=int(event["s"]), open=finite_number(event["o"]),
        high=finite_number(event["h"]), low=finite_number(event["l"]),
        close=finite_number(event["c"]), volume=finite_number(event["v"]),
    )


def agg_from_rest(symbol: str, result: Any) -> MinuteAgg:
    """A REST aggregate (``polygon.rest.models.Agg`` or its JSON dict) as a MinuteAgg."""
    if isinstance(result, dict):
        t, o, h, lo, c, v = (result.get(k) for k in ("t", "o", "h", "l", "c", "v"))
    else:
        t, o, h, lo, c, v = (result.timestamp, result.open, result.high, result.low,
                             result.close, result.volume)
    if t is None:
        raise ValueError("aggregate without a timestamp")
    return MinuteAgg(symbol, int(t), finite_number(o), finite_number(h),
                     finite_number(lo), finite_number(c), finite_number(v))


def parse_frame(raw: str | bytes) -> tuple[list[MinuteAgg], list[dict], int]:
    """One WebSocket frame -> (minute aggregates, status messages, unusable events)."""
    try:
        data = json.loads(raw)
    except (TypeError, ValueError):
        return [], [], 1
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        return [], [], 1
    aggs: list[MinuteAgg] = []
    statuses: list[dict] = []
    bad = 0
    for event in data:
        if not isinstance(event, dict):
            bad += 1
            continue
        ev = event.get("ev")
        if ev == "status":
            statuses.append(event)
        elif ev == "AM":
            try:
                aggs.append(agg_from_event(event))
            except (KeyError, TypeError, ValueError):
                bad += 1
    return aggs, statuses, bad


def split_ws_url(url: str) -> tuple[str, bool]:
    """``wss://socket.polygon.io`` -> (``socket.polygon.io``, True): the client's feed/secure."""
    parsed = urlparse(url if "://" in url else f"wss://{url}")
    if parsed.scheme not in ("ws", "wss"):
        raise ValueError(f"Polygon stream URL must start with ws:// or wss://, got {url!r}")
    host = parsed.netloc + parsed.path.rstrip("/")
    return host, parsed.scheme == "wss"


# --- REST --------------------------------------------------------------------------------


class PolygonHistory:
    """Minute bars from Polygon's aggregates endpoint (one paginated request per symbol)."""

    name = "polygon"

    def __init__(self, api_key: str, base_url: str = DEFAULT_REST_URL, timeout_s: float = 10.0,
                 retries: int = 3, workers: int = 4, adjusted: bool = True) -> None:
        import urllib3
        from polygon import RESTClient

        self._key = api_key
        self._workers = max(1, workers)
        self._adjusted = adjusted
        self.client = RESTClient(api_key=api_key, base=base_url.rstrip("/"),
                                 connect_timeout=timeout_s, read_timeout=timeout_s,
                                 retries=retries, num_pools=max(10, self._workers))
        # polygon-api-client builds this Timeout but never hands it to urllib3
        self.client.client.connection_pool_kw["timeout"] = urllib3.Timeout(
            connect=timeout_s, read=timeout_s)
        self.client.client.connection_pool_kw["maxsize"] = self._workers

    def fetch_symbol(self, symbol: str, start: dt.datetime, end: dt.datetime) -> list[MinuteAgg]:
        """Bars of ``symbol`` starting in ``[start, end)``, ascending; raises on failure."""
        start_ms, end_ms = to_ms(start), to_ms(end)
        out: list[MinuteAgg] = []
        for result in self.client.list_aggs(symbol, 1, "minute", start_ms, end_ms - 1,
                                            adjusted=self._adjusted, sort="asc",
                                            limit=_PAGE_LIMIT):
            try:
                agg = agg_from_rest(symbol, result)
            except (TypeError, ValueError):
                continue
            if start_ms <= agg.start_ms < end_ms:
                out.append(agg)
        return out

    def _safe_reason(self, exc: BaseException) -> str:
        text = f"{type(exc).__name__}: {exc}".replace(self._key, "***")
        return text[:300]

    def fetch_minutes(self, symbols: Sequence[str], start: dt.datetime,
                      end: dt.datetime) -> FetchResult:
        """Every symbol's bars in ``[start, end)``; symbols that failed are in ``failed``."""
        res = FetchResult()

        def one(sym: str) -> tuple[str, list[MinuteAgg] | None, str]:
            try:
                return sym, self.fetch_symbol(sym, start, end), ""
            except Exception as exc:  # urllib3 MaxRetryError, BadResponse, timeouts, ...
                return sym, None, self._safe_reason(exc)

        if self._workers == 1 or len(symbols) == 1:
            answers = [one(s) for s in symbols]
        else:
            with ThreadPoolExecutor(max_workers=min(self._workers, len(symbols)),
                                    thread_name_prefix="polygon-rest") as pool:
                answers = list(pool.map(one, symbols))
        for sym, aggs, reason in answers:
            if aggs is None:
                res.failed[sym] = reason
            else:
                res.aggs.extend(aggs)
        return res


# --- stream ------------------------------------------------------------------------------


class PolygonStreamSession:
    """One WebSocket connection subscribed to ``AM.<sym>`` (a new one per reconnect)."""

    def __init__(self, api_key: str, symbols: Sequence[str], ws_url: str = DEFAULT_WS_URL,
                 reconnect_min_s: float = 1.0, reconnect_max_s: float = 60.0) -> None:
        self._key = api_key
        self._symbols = tuple(symbols)
        self._host, self._secure = split_ws_url(ws_url)
        self._delays = (reconnect_min_s, reconnect_max_s)

    def _connect_kwargs(self) -> dict[str, Any]:
        from websockets.asyncio.client import connect

        kwargs: dict[str, Any] = {}
        if "reconnect_delays" in inspect.signature(connect.__init__).parameters:
            lo, hi = self._delays
            kwargs["reconnect_delays"] = lambda: backoff_delays(lo, hi)
        return kwargs

    async def run(self, sink: StreamSink) -> None:
        from polygon import WebSocketClient
        from polygon.exceptions import AuthError
        from polygon.websocket.models import Market

        client = WebSocketClient(api_key=self._key, feed=self._host, market=Market.Stocks,
                                 raw=True, subscriptions=[f"AM.{s}" for s in self._symbols],
                                 max_reconnects=0, secure=self._secure)

        async def processor(frame: str | bytes) -> None:
            sink.on_message()
            aggs, statuses, bad = parse_frame(frame)
            for st in statuses:
                status, message = st.get("status"), str(st.get("message", ""))
                if status == "success" and message.startswith("subscribed to"):
                    sink.on_subscribed()
                elif status == "auth_failed":
                    raise StreamAuthError(f"Polygon refused the API key: {message}")
                elif status not in ("success", "connected", "auth_success"):
                    log.warning("Polygon stream status %s: %s", status, message)
            if bad:
                log.warning("Polygon stream: %d unusable events in a frame", bad)
            if aggs:
                sink.on_aggs(aggs)

        try:
            await client.connect(processor, **self._connect_kwargs())
        except AuthError as exc:
            raise StreamAuthError(f"Polygon refused the API key: {exc}") from None
        finally:
            if client.websocket is not None:
                with contextlib.suppress(Exception):
                    await client.close()


def sources_from_settings(settings: Any, config: FeedConfig, symbols: Sequence[str]
                          ) -> tuple[PolygonHistory, Callable[[], StreamSession]]:
    """The REST source and a stream factory from the settings (URLs overridable)."""
    key = settings.polygon_api_key.get_secret_value()
    rest_url = getattr(settings, "polygon_rest_url", None) or DEFAULT_REST_URL
    ws_url = getattr(settings, "polygon_ws_url", None) or DEFAULT_WS_URL
    history = PolygonHistory(key, rest_url, timeout_s=config.http_timeout_s)
    split_ws_url(ws_url)  # validate at start-up

    def factory() -> StreamSession:
        return PolygonStreamSession(key, symbols, ws_url, config.reconnect_min_s,
                                    config.reconnect_max_s)

    return history, factory
