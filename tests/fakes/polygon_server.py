"""Local stand-ins for the market-data vendors, for tests with the REAL client libraries.

- ``PolygonRestServer``: Polygon's aggregates endpoint
  ``GET /v2/aggs/ticker/{sym}/range/{mult}/minute/{from}/{to}`` (from/to as Unix ms or
  YYYY-MM-DD, New York dates), documented JSON (``ticker, queryCount, resultsCount, adjusted,
  results[{t,o,h,l,c,v,vw,n}], status, request_id, count, next_url``; ``results`` absent when
  empty), pagination through ``next_url``, Bearer or ``apiKey`` auth, and 429/5xx or slow
  answers on demand.
- ``PolygonStreamServer``: Polygon's stocks WebSocket (``/stocks``): ``connected`` status,
  ``auth`` with the key (``auth_success`` / ``auth_failed``), ``subscribe`` (``AM.SYM``,
  ``AM.*``), then arrays of ``AM`` events; it can go silent or drop every connection.
- ``AlpacaDataServer``: Alpaca's ``GET /v2/stocks/bars`` (multi-symbol, ``next_page_token``).

All servers listen on 127.0.0.1 on a free port, in daemon threads; use them as context
managers.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import threading
import time
import uuid
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse
from zoneinfo import ZoneInfo

from tests.fakes.ws import ThreadedWsServer

NY = ZoneInfo("America/New_York")
UTC = dt.UTC


def ms(ts: dt.datetime) -> int:
    """Unix milliseconds of an aware datetime."""
    return (ts - dt.datetime(1970, 1, 1, tzinfo=UTC)) // dt.timedelta(milliseconds=1)


def rest_bar(start: dt.datetime, o: float, h: float, lo: float, c: float, v: float) -> dict:
    """A Polygon REST aggregate result (``t`` = bar start, Unix ms UTC)."""
    return {"t": ms(start), "o": o, "h": h, "l": lo, "c": c, "v": v,
            "vw": round((o + h + lo + c) / 4, 4), "n": max(1, int(v // 100))}


def am_event(symbol: str, start: dt.datetime, o: float, h: float, lo: float, c: float,
             v: float) -> dict:
    """A Polygon ``AM`` stream event for the minute starting at ``start``."""
    s = ms(start)
    return {"ev": "AM", "sym": symbol, "v": v, "av": v * 10, "op": o, "vw": (h + lo) / 2,
            "o": o, "c": c, "h": h, "l": lo, "a": (h + lo) / 2, "z": 100, "s": s,
            "e": s + 60_000}


class _ThreadingServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class _HttpFake:
    """Common start/stop and failure injection for the HTTP fakes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._failures: list[tuple[int, str | None, str]] = []
        self.delay_s = 0.0
        self.requests: list[tuple[str, dict[str, list[str]]]] = []
        self._httpd: _ThreadingServer | None = None
        self._thread: threading.Thread | None = None

    def fail_next(self, status: int, times: int = 1, retry_after: str | None = None,
                  body: str = '{"status":"ERROR","error":"injected"}') -> None:
        """Answer the next ``times`` requests with ``status`` (e.g. 429 or 500)."""
        with self._lock:
            self._failures.extend([(status, retry_after, body)] * times)

    def _take_failure(self) -> tuple[int, str | None, str] | None:
        with self._lock:
            return self._failures.pop(0) if self._failures else None

    @property
    def url(self) -> str:
        assert self._httpd is not None
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # headers and body go out in two writes: without this a keep-alive client waits
            # for the delayed ACK (~40 ms a request)
            disable_nagle_algorithm = True

            def log_message(self, fmt: str, *args: object) -> None:  # quiet
                return

            def do_GET(self) -> None:
                parsed = urlparse(self.path)
                query = parse_qs(parsed.query)
                with fake._lock:
                    fake.requests.append((parsed.path, query))
                if fake.delay_s:
                    time.sleep(fake.delay_s)
                failure = fake._take_failure()
                if failure is not None:
                    status, retry_after, body = failure
                    headers = {"Retry-After": retry_after} if retry_after else {}
                    self._send(status, body.encode(), headers)
                    return
                status, payload = fake.answer(parsed.path, query, self.headers)
                self._send(status, json.dumps(payload).encode())

            def _send(self, status: int, body: bytes, headers: dict | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(body)  # the client may have timed out already

        return Handler

    def answer(self, path: str, query: dict, headers) -> tuple[int, dict]:
        raise NotImplementedError

    def start(self):
        self._httpd = _ThreadingServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True,
                                        name=type(self).__name__)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class PolygonRestServer(_HttpFake):
    """Polygon's minute aggregates over HTTP, from bars given per symbol."""

    def __init__(self, api_key: str = "test-key", page_size: int = 50_000) -> None:
        super().__init__()
        self.api_key = api_key
        self.page_size = page_size
        self.bars: dict[str, list[dict]] = {}

    def add_bars(self, symbol: str, results: Iterable[dict]) -> None:
        """Serve these REST results (``rest_bar``) for ``symbol`` (merged, sorted by ``t``)."""
        with self._lock:
            rows = {r["t"]: r for r in self.bars.get(symbol, [])}
            rows.update({r["t"]: r for r in results})
            self.bars[symbol] = [rows[t] for t in sorted(rows)]

    @staticmethod
    def _bound(text: str, end: bool) -> int:
        if text.isdigit():
            return int(text)
        day = dt.date.fromisoformat(text)
        if end:
            day += dt.timedelta(days=1)
        return ms(dt.datetime.combine(day, dt.time(0), tzinfo=NY)) - (1 if end else 0)

    def answer(self, path: str, query: dict, headers) -> tuple[int, dict]:
        parts = path.strip("/").split("/")
        req_id = uuid.uuid4().hex
        auth = headers.get("Authorization", "")
        if auth != f"Bearer {self.api_key}" and query.get("apiKey", [""])[0] != self.api_key:
            return 401, {"status": "ERROR", "request_id": req_id,
                         "error": "Unknown API Key"}
        if (len(parts) != 9 or parts[:3] != ["v2", "aggs", "ticker"] or parts[4] != "range"
                or parts[6] != "minute"):
            return 404, {"status": "NOT_FOUND", "request_id": req_id, "message": "not found"}
        symbol, mult, frm, to = parts[3], int(parts[5]), parts[7], parts[8]
        if mult != 1:
            return 400, {"status": "ERROR", "request_id": req_id, "error": "only 1 minute"}
        lo, hi = self._bound(frm, False), self._bound(to, True)
        with self._lock:
            rows = [r for r in self.bars.get(symbol, []) if lo <= r["t"] <= hi]
        if query.get("sort", ["asc"])[0] == "desc":
            rows.reverse()
        limit = min(int(query.get("limit", ["5000"])[0]), self.page_size)
        offset = int(query.get("cursor", ["0"])[0])
        page = rows[offset:offset + limit]
        out: dict = {"ticker": symbol, "queryCount": len(page), "resultsCount": len(page),
                     "adjusted": query.get("adjusted", ["true"])[0] == "true",
                     "status": "OK", "request_id": req_id, "count": len(page)}
        if page:
            out["results"] = page
        if offset + limit < len(rows):
            out["next_url"] = (f"{self.url}/v2/aggs/ticker/{symbol}/range/1/minute/{frm}/{to}"
                               f"?cursor={offset + limit}&limit={limit}"
                               f"&sort={query.get('sort', ['asc'])[0]}")
        return 200, out


class AlpacaDataServer(_HttpFake):
    """Alpaca's ``GET /v2/stocks/bars`` (1Min) from bars given per symbol."""

    def __init__(self, key: str = "ak", secret: str = "as", page_size: int = 10_000) -> None:
        super().__init__()
        self.key, self.secret = key, secret
        self.page_size = page_size
        self.bars: dict[str, list[dict]] = {}

    def add_bars(self, symbol: str, rows: Iterable[tuple[dt.datetime, float, float, float,
                                                          float, float]]) -> None:
        """Serve ``(start, o, h, l, c, v)`` rows for ``symbol``."""
        items = [{"t": start.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), "o": o, "h": h,
                  "l": lo, "c": c, "v": v, "n": 10, "vw": (h + lo) / 2}
                 for start, o, h, lo, c, v in rows]
        with self._lock:
            self.bars.setdefault(symbol, []).extend(items)
            self.bars[symbol].sort(key=lambda r: r["t"])

    @staticmethod
    def _ts(text: str) -> dt.datetime:
        ts = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
        return ts if ts.tzinfo else ts.replace(tzinfo=UTC)

    def answer(self, path: str, query: dict, headers) -> tuple[int, dict]:
        if (headers.get("APCA-API-KEY-ID") != self.key
                or headers.get("APCA-API-SECRET-KEY") != self.secret):
            return 401, {"message": "unauthorized."}
        if path != "/v2/stocks/bars":
            return 404, {"message": "not found"}
        if query.get("timeframe", [""])[0] != "1Min":
            return 400, {"message": f"unsupported timeframe {query.get('timeframe')}"}
        symbols = query.get("symbols", [""])[0].split(",")
        start = self._ts(query["start"][0])
        end = self._ts(query["end"][0]) if "end" in query else dt.datetime.max.replace(
            tzinfo=UTC)
        flat = []
        with self._lock:
            for sym in sorted(symbols):
                for r in self.bars.get(sym, []):
                    if start <= self._ts(r["t"]) <= end:
                        flat.append((sym, r))
        limit = min(int(query.get("limit", ["1000"])[0]), self.page_size)
        token = query.get("page_token", [""])[0]
        offset = int(token) if token else 0
        page = flat[offset:offset + limit]
        bars: dict[str, list[dict]] = {}
        for sym, r in page:
            bars.setdefault(sym, []).append(r)
        nxt = str(offset + limit) if offset + limit < len(flat) else None
        return 200, {"bars": bars, "next_page_token": nxt}


class PolygonStreamServer(ThreadedWsServer):
    """Polygon's stocks WebSocket protocol on ``ws://127.0.0.1:PORT/stocks``."""

    name = "polygon-ws"

    def __init__(self, api_key: str = "test-key") -> None:
        super().__init__()
        self.api_key = api_key
        self._conns: dict[object, dict] = {}  # connection -> {"subs": set, "silent": bool}
        self.connections_total = 0
        self.subscribed_total = 0
        self.auth_failures = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def _handler(self, conn) -> None:
        self.connections_total += 1
        path = conn.request.path if conn.request is not None else "/"
        state = {"subs": set(), "silent": False, "authed": False}
        await conn.send(json.dumps([{"ev": "status", "status": "connected",
                                     "message": "Connected Successfully"}]))
        if path.rstrip("/") != "/stocks":
            await conn.close(1008, "unknown cluster")
            return
        self._conns[conn] = state
        try:
            async for raw in conn:
                msg = json.loads(raw)
                action, params = msg.get("action"), str(msg.get("params", ""))
                if action == "auth":
                    if params == self.api_key:
                        state["authed"] = True
                        await conn.send(json.dumps([{"ev": "status", "status": "auth_success",
                                                     "message": "authenticated"}]))
                    else:
                        self.auth_failures += 1
                        await conn.send(json.dumps([{"ev": "status", "status": "auth_failed",
                                                     "message": "authentication failed"}]))
                        await conn.close()
                        return
                elif not state["authed"]:
                    await conn.send(json.dumps([{"ev": "status", "status": "error",
                                                 "message": "not authorized"}]))
                elif action == "subscribe":
                    subs = [p.strip() for p in params.split(",") if p.strip()]
                    state["subs"].update(subs)
                    if not state["silent"]:
                        await conn.send(json.dumps([
                            {"ev": "status", "status": "success",
                             "message": f"subscribed to: {s}"} for s in subs]))
                    self.subscribed_total += 1
                elif action == "unsubscribe":
                    for p in params.split(","):
                        state["subs"].discard(p.strip())
        except Exception:  # a dropped connection ends here
            pass
        finally:
            self._conns.pop(conn, None)

    # test controls ---------------------------------------------------------------------
    def subscribed_symbols(self) -> set[str]:
        """Subscriptions of the live (authed) connections."""
        out: set[str] = set()
        for state in list(self._conns.values()):
            out |= state["subs"]
        return out

    def live_connections(self) -> int:
        return len(self._conns)

    def send(self, events: list[dict]) -> int:
        """Send ``events`` (one frame) to every subscribed, non-silent connection."""

        async def go() -> int:
            sent = 0
            for conn, state in list(self._conns.items()):
                if state["silent"] or not state["authed"]:
                    continue
                subs = state["subs"]
                mine = [e for e in events
                        if e.get("ev") != "AM" or "AM.*" in subs or f"AM.{e['sym']}" in subs]
                if mine:
                    try:
                        await conn.send(json.dumps(mine))
                        sent += 1
                    except Exception:
                        pass
            return sent

        return self._call(go())

    def silence(self) -> None:
        """Keep the current connections open but send nothing on them any more."""

        async def go() -> None:
            for state in self._conns.values():
                state["silent"] = True

        self._call(go())


class AlpacaStreamServer(ThreadedWsServer):
    """Alpaca's market-data stream (msgpack frames) on ``ws://127.0.0.1:PORT/v2/iex``.

    ``[{"T":"success","msg":"connected"}]``, ``auth`` with key and secret
    (``authenticated`` / ``{"T":"error","code":402,"msg":"auth failed"}``), ``subscribe``
    answered with a ``subscription`` frame, then bar frames ``{"T":"b","S":..,"t":Timestamp,
    "o","h","l","c","v","n","vw"}``. It can drop every connection.
    """

    name = "alpaca-ws"

    def __init__(self, key: str = "ak", secret: str = "as") -> None:
        super().__init__()
        self.key, self.secret = key, secret
        self._conns: dict[object, set[str]] = {}
        self.connections_total = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v2/iex"

    async def _handler(self, conn) -> None:
        import msgpack

        self.connections_total += 1
        await conn.send(msgpack.packb([{"T": "success", "msg": "connected"}]))
        authed = False
        try:
            async for raw in conn:
                msg = msgpack.unpackb(raw)
                if msg.get("action") == "auth":
                    if msg.get("key") == self.key and msg.get("secret") == self.secret:
                        authed = True
                        self._conns[conn] = set()
                        await conn.send(msgpack.packb([{"T": "success",
                                                        "msg": "authenticated"}]))
                    else:
                        await conn.send(msgpack.packb([{"T": "error", "code": 402,
                                                        "msg": "auth failed"}]))
                        await conn.close()
                        return
                elif authed and msg.get("action") == "subscribe":
                    self._conns[conn] |= set(msg.get("bars", []))
                    await conn.send(msgpack.packb([{
                        "T": "subscription", "trades": [], "quotes": [],
                        "bars": sorted(self._conns[conn]), "updatedBars": [],
                        "dailyBars": [], "statuses": [], "lulds": [],
                        "corrections": [], "cancelErrors": []}]))
        except Exception:
            pass
        finally:
            self._conns.pop(conn, None)

    def subscribed(self) -> set[str]:
        out: set[str] = set()
        for subs in list(self._conns.values()):
            out |= subs
        return out

    def send_bars(self, rows: Iterable[tuple[str, dt.datetime, float, float, float, float,
                                             float]]) -> None:
        """Send ``(symbol, start, o, h, l, c, v)`` bars (one frame) to subscribed clients."""
        import msgpack

        rows = list(rows)

        async def go() -> None:
            for conn, subs in list(self._conns.items()):
                frame = [{"T": "b", "S": s, "t": msgpack.Timestamp.from_unix_nano(
                    ms(start) * 1_000_000), "o": o, "h": h, "l": lo, "c": c, "v": v,
                    "n": 10, "vw": (h + lo) / 2}
                    for s, start, o, h, lo, c, v in rows if s in subs or "*" in subs]
                if frame:
                    with contextlib.suppress(Exception):
                        await conn.send(msgpack.packb(frame))

        self._call(go())
