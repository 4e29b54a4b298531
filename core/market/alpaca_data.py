"""Alpaca market data: minute bars over REST and the live ``bars`` stream (no Polygon key).

REST: ``StockHistoricalDataClient.get_stock_bars(StockBarsRequest(..., TimeFrame.Minute))``
(GET ``/v2/stocks/bars``, many symbols per request, ``next_page_token`` pages); each bar has
``t`` = bar START (RFC-3339, UTC) and ``o h l c v`` (plus ``n vw``).
Stream: ``StockDataStream.subscribe_bars`` (msgpack frames ``{"T":"b","S":sym,"t":start,...}``
sent after each minute ends, only for symbols that traded).

Version traps (alpaca-py 0.44): no HTTP timeout by default (one is set on the session here);
429/504 are retried by the client itself (3 tries, 3 s apart); ``StockDataStream`` reconnects
by itself and tells nobody, so a subclass reports disconnects and subscriptions to the feed,
which then backfills the gap from REST. ``feed`` is ``iex`` unless the account has SIP.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

from core.market.feed import (
    FeedConfig,
    FetchResult,
    MinuteAgg,
    StreamSession,
    StreamSink,
    finite_number,
    to_ms,
)
from core.market.minutes import _EPOCH_UTC

log = logging.getLogger(__name__)

_SYMBOLS_PER_REQUEST = 100


def time_ms(value: Any) -> int:
    """Unix ms of an Alpaca bar time: RFC-3339 text, datetime, or msgpack Timestamp."""
    if hasattr(value, "to_unix_nano"):
        return int(value.to_unix_nano()) // 1_000_000
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return (value - _EPOCH_UTC) // dt.timedelta(milliseconds=1)
    raise ValueError(f"not a bar time: {value!r}")


def agg_from_bar(symbol: str, bar: Any) -> MinuteAgg:
    """An Alpaca bar (raw dict with ``t o h l c v``, or an ``alpaca.data.models.Bar``)."""
    if isinstance(bar, dict):
        t, o, h, lo, c, v = (bar.get(k) for k in ("t", "o", "h", "l", "c", "v"))
    else:
        t, o, h, lo, c, v = (bar.timestamp, bar.open, bar.high, bar.low, bar.close, bar.volume)
    return MinuteAgg(symbol, time_ms(t), finite_number(o), finite_number(h),
                     finite_number(lo), finite_number(c), finite_number(v))


class AlpacaHistory:
    """Minute bars from Alpaca's historical data API."""

    name = "alpaca"

    def __init__(self, api_key: str, secret_key: str, url: str | None = None,
                 feed: str = "iex", adjustment: str = "split", timeout_s: float = 10.0,
                 retry_wait_s: int = 3) -> None:
        from alpaca.data.historical import StockHistoricalDataClient

        self._secrets = (api_key, secret_key)
        self._feed = feed
        self._adjustment = adjustment
        self.client = StockHistoricalDataClient(api_key, secret_key, raw_data=True,
                                                url_override=url.rstrip("/") if url else None)
        session = self.client._session  # alpaca-py sends without a timeout
        session.request = functools.partial(session.request, timeout=timeout_s)
        self.client._retry_wait = max(1, int(retry_wait_s))

    def _request(self, symbols: Sequence[str], start: dt.datetime, end: dt.datetime) -> Any:
        from alpaca.data.enums import Adjustment, DataFeed
        from alpaca.data.requests import StockBarsRequest
        from alpaca.data.timeframe import TimeFrame

        req = StockBarsRequest(symbol_or_symbols=list(symbols), timeframe=TimeFrame.Minute,
                               start=start, end=end, feed=DataFeed(self._feed),
                               adjustment=Adjustment(self._adjustment))
        return self.client.get_stock_bars(req)

    def fetch_minutes(self, symbols: Sequence[str], start: dt.datetime,
                      end: dt.datetime) -> FetchResult:
        """Every symbol's bars starting in ``[start, end)``; failed requests name symbols."""
        res = FetchResult()
        start_ms, end_ms = to_ms(start), to_ms(end)
        last = end - dt.timedelta(seconds=1)  # Alpaca's ``end`` is inclusive
        for i in range(0, len(symbols), _SYMBOLS_PER_REQUEST):
            chunk = list(symbols[i:i + _SYMBOLS_PER_REQUEST])
            try:
                raw = self._request(chunk, start, last)
            except Exception as exc:  # APIError, requests errors, timeouts
                reason = f"{type(exc).__name__}: {exc}"
                for secret in self._secrets:
                    reason = reason.replace(secret, "***")
                for sym in chunk:
                    res.failed[sym] = reason[:300]
                continue
            data = raw.data if hasattr(raw, "data") else raw
            for sym, bars in (data or {}).items():
                for bar in bars or []:
                    try:
                        agg = agg_from_bar(sym, bar)
                    except (TypeError, ValueError):
                        continue
                    if start_ms <= agg.start_ms < end_ms:
                        res.aggs.append(agg)
        return res


def _hooked_stream_class():
    from alpaca.data.live import StockDataStream

    class HookedStockDataStream(StockDataStream):
        """StockDataStream that reports (re)subscriptions and disconnects to the feed."""

        sink: StreamSink | None = None

        async def _send_subscribe_msg(self) -> None:
            await super()._send_subscribe_msg()
            if self.sink is not None:
                self.sink.on_subscribed()

        async def close(self) -> None:
            if self.sink is not None:
                self.sink.on_disconnected()
            await super().close()

    return HookedStockDataStream


class AlpacaStreamSession:
    """The ``bars`` stream of the universe; the client reconnects on its own."""

    def __init__(self, api_key: str, secret_key: str, symbols: Sequence[str],
                 url: str | None = None, feed: str = "iex") -> None:
        self._key, self._secret = api_key, secret_key
        self._symbols = tuple(symbols)
        self._url = url
        self._feed = feed

    async def run(self, sink: StreamSink) -> None:
        from alpaca.data.enums import DataFeed

        cls = _hooked_stream_class()
        stream = cls(self._key, self._secret, raw_data=True, feed=DataFeed(self._feed),
                     url_override=self._url)
        stream.sink = sink

        async def on_bar(bar: Any) -> None:
            sink.on_message()
            try:
                sym = bar["S"] if isinstance(bar, dict) else bar.symbol
                sink.on_aggs([agg_from_bar(sym, bar)])
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("Alpaca stream: unusable bar %r: %s", bar, exc)

        stream.subscribe_bars(on_bar, *self._symbols)
        try:
            await stream._run_forever()
        finally:
            stream.sink = None
            with contextlib.suppress(Exception):  # already closed
                await stream.close()


def sources_from_settings(settings: Any, config: FeedConfig, symbols: Sequence[str]
                          ) -> tuple[AlpacaHistory, Callable[[], StreamSession]]:
    """The REST source and a stream factory from the settings (URLs overridable)."""
    key = settings.alpaca_api_key.get_secret_value()
    secret = settings.alpaca_secret_key.get_secret_value()
    feed = getattr(settings, "alpaca_data_feed", None) or "iex"
    rest_url = getattr(settings, "alpaca_data_url", None)
    stream_url = getattr(settings, "alpaca_stream_url", None)
    history = AlpacaHistory(key, secret, rest_url, feed=feed, timeout_s=config.http_timeout_s)

    def factory() -> StreamSession:
        return AlpacaStreamSession(key, secret, symbols, stream_url, feed)

    return history, factory
