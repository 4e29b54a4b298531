"""A local Alpaca: the trading REST API (v2) and the trade_updates WebSocket, in threads.

REST (stdlib ``http.server``) speaks Alpaca's documented JSON for /v2/account, /v2/clock,
/v2/calendar, /v2/assets/{symbol}, /v2/positions (GET, GET/DELETE /{symbol}, DELETE all),
/v2/orders (POST; GET with status/after/until/direction/nested/symbols/limit; DELETE all),
/v2/orders:by_client_order_id and /v2/orders/{id} (GET, DELETE). Errors use Alpaca's body
``{"code": ..., "message": ...}``.

Programmable behaviour:
- prices: ``prices[symbol]`` (``set_price()``), or ``price_source(symbol)`` when set (a
  callable, e.g. ``ReplayPrices``: the close of the replay's current bar, read from Redis,
  for a server whose market follows a replay run by other processes); ``now`` is the clock;
- fills: ``fill_mode`` "immediate" (marketable orders fill at the symbol's price, IOC
  remainders cancel), "partial" (``partial_qty`` shares fill now), "none" (orders rest);
  ``fill()``, ``cancel()``, ``expire()``, ``reject()`` move an order later; ``set_price()``
  triggers resting stops (OTO legs);
- errors: ``fail(status, message, times=N, method=, path=)`` answers N matching requests with
  that error (``times=None``: until ``clear_faults()``: a storm); ``delay(seconds, ...)``
  makes matching requests slow (to trigger client timeouts);
- the real checks Alpaca makes: duplicate client_order_id (422), buying power (403), not
  shortable (403), wash trade (403), insufficient qty (403), unknown asset (422).
Every request is logged in ``requests`` (monotonic time, method, path, query, status).

WebSocket (``websockets``): auth (``{"action": "authenticate"|"auth", ...}``), listen,
then ``trade_updates`` events as JSON text for every order change; ``drop()`` cuts every
connection, ``refuse`` turns new connections away (events meanwhile are lost, as they would
be at Alpaca).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

from tests.fakes.alpaca_stream import FakeTradeStream

UTC = dt.UTC
_WORKING = {"new", "accepted", "pending_new", "partially_filled", "held", "pending_cancel"}


def _now_iso(ts: dt.datetime | None = None) -> str:
    ts = ts or dt.datetime.now(UTC)
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_ts(raw: str) -> dt.datetime:
    ts = dt.datetime.fromisoformat(raw.replace("Z", "+00:00").replace(" ", "+"))
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


def _dec(v: Any) -> Decimal:
    return Decimal(repr(v)) if isinstance(v, float) else Decimal(str(v))


def _s(d: Decimal) -> str:
    return format(d.normalize(), "f") if d == d.to_integral_value() else format(d, "f")


@dataclass
class Fault:
    """An error (or a delay) for the requests that match."""

    status: int | None
    message: str
    times: int | None
    method: str | None = None
    path: str | None = None
    delay_s: float = 0.0
    code: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def matches(self, method: str, path: str) -> bool:
        if self.method and self.method != method:
            return False
        return not self.path or re.search(self.path, path) is not None


@dataclass
class Seen:
    """One request as the server saw it."""

    t: float
    method: str
    path: str
    query: dict[str, str]
    body: Any
    status: int = 0


class FakeAlpaca:
    """The fake account, its REST server and its stream server."""

    def __init__(self, key: str = "test-key", secret: str = "test-secret",
                 stream: bool = True) -> None:
        self.key = key
        self.secret = secret
        self.lock = threading.RLock()
        self.account: dict[str, Any] = {
            "id": str(uuid.uuid4()), "account_number": "PA0000TEST", "status": "ACTIVE",
            "crypto_status": "ACTIVE", "currency": "USD", "buying_power": "400000",
            "regt_buying_power": "200000", "daytrading_buying_power": "400000",
            "non_marginable_buying_power": "100000", "cash": "100000", "accrued_fees": "0",
            "portfolio_value": "100000", "pattern_day_trader": False, "trading_blocked": False,
            "transfers_blocked": False, "account_blocked": False,
            "created_at": "2024-01-02T14:00:00Z", "trade_suspended_by_user": False,
            "multiplier": "4", "shorting_enabled": True, "equity": "100000",
            "last_equity": "100000", "long_market_value": "0", "short_market_value": "0",
            "initial_margin": "0", "maintenance_margin": "0", "last_maintenance_margin": "0",
            "sma": "0", "daytrade_count": 0,
        }
        self.prices: dict[str, Decimal] = {}
        self.assets: dict[str, dict[str, Any]] = {}
        self.positions: dict[str, tuple[int, Decimal]] = {}
        self.orders: dict[str, dict[str, Any]] = {}  # id -> Alpaca order JSON (insertion order)
        self.faults: list[Fault] = []
        self.requests: list[Seen] = []
        self.fill_mode = "immediate"
        self.partial_qty: int | None = None
        self.market_open = True
        self.now: Callable[[], dt.datetime] = lambda: dt.datetime.now(UTC)
        # symbol -> price (None: no price there, ``prices`` decides); resting stops trigger
        # only on set_price()
        self.price_source: Callable[[str], Decimal | None] | None = None
        self.events: list[dict[str, Any]] = []  # every trade update produced (sent or not)
        self._http: ThreadingHTTPServer | None = None
        self._http_thread: threading.Thread | None = None
        self.stream = FakeTradeStream(self) if stream else None

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> FakeAlpaca:
        handler = type("Handler", (_Handler,), {"fake": self})
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._http.daemon_threads = True
        self._http_thread = threading.Thread(target=self._http.serve_forever,
                                             name="fake-alpaca-http", daemon=True)
        self._http_thread.start()
        if self.stream is not None:
            self.stream.start()
        return self

    def stop(self) -> None:
        if self.stream is not None:
            self.stream.stop()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()

    def __enter__(self) -> FakeAlpaca:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        """What ``TradingClient(url_override=...)`` takes (no /v2)."""
        assert self._http is not None
        return f"http://127.0.0.1:{self._http.server_address[1]}"

    @property
    def stream_url(self) -> str:
        """What ``TradingStream(url_override=...)`` takes."""
        assert self.stream is not None
        return self.stream.url

    # -- programming ------------------------------------------------------------------------
    def set_asset(self, symbol: str, **fields: Any) -> None:
        with self.lock:
            self._asset(symbol).update(fields)

    def fail(self, status: int, message: str, times: int | None = 1, method: str | None = None,
             path: str | None = None, code: int | None = None, **extra: Any) -> Fault:
        """Answer matching requests with an error (``times=None``: until cleared)."""
        f = Fault(status, message, times, method, path, code=code, extra=extra)
        with self.lock:
            self.faults.append(f)
        return f

    def delay(self, seconds: float, times: int | None = 1, method: str | None = None,
              path: str | None = None) -> Fault:
        """Make matching requests take ``seconds`` before they are answered normally."""
        f = Fault(None, "", times, method, path, delay_s=seconds)
        with self.lock:
            self.faults.append(f)
        return f

    def clear_faults(self) -> None:
        with self.lock:
            self.faults.clear()

    def seen(self, method: str | None = None, path: str | None = None) -> list[Seen]:
        """Requests seen, optionally filtered by method and path regex."""
        with self.lock:
            return [r for r in self.requests if (method is None or r.method == method)
                    and (path is None or re.search(path, r.path))]

    def set_position(self, symbol: str, qty: int, avg: str) -> None:
        with self.lock:
            if qty:
                self.positions[symbol] = (qty, Decimal(avg))
            else:
                self.positions.pop(symbol, None)

    def order(self, key: str) -> dict[str, Any]:
        """An order by id or client_order_id."""
        with self.lock:
            if key in self.orders:
                return self.orders[key]
            for o in self.orders.values():
                if o["client_order_id"] == key:
                    return o
        raise KeyError(key)

    def fill(self, key: str, qty: int | None = None, price: str | None = None) -> dict[str, Any]:
        """Fill ``qty`` more shares (default: the rest) of an order."""
        with self.lock:
            o = self.order(key)
            left = int(o["qty"]) - int(o["filled_qty"])
            px = Decimal(price) if price else self._price(o["symbol"])
            self._execute(o, min(left, qty or left), px)
            return dict(o)

    def cancel(self, key: str) -> None:
        with self.lock:
            self._finish(self.order(key), "canceled")

    def expire(self, key: str) -> None:
        with self.lock:
            self._finish(self.order(key), "expired")

    def reject(self, key: str) -> None:
        with self.lock:
            self._finish(self.order(key), "rejected")

    def set_price(self, symbol: str, price: str) -> None:
        """Move the price; resting stops it crosses fill at it."""
        with self.lock:
            px = Decimal(price)
            self.prices[symbol] = px
            for o in list(self.orders.values()):
                if (o["symbol"] != symbol or o["type"] != "stop"
                        or o["status"] not in ("new", "accepted", "partially_filled")):
                    continue
                stop = Decimal(o["stop_price"])
                if (o["side"] == "sell" and px <= stop) or (o["side"] == "buy" and px >= stop):
                    self._execute(o, int(o["qty"]) - int(o["filled_qty"]), px)

    # -- state changes (lock held) -------------------------------------------------------------
    def _asset(self, symbol: str) -> dict[str, Any]:
        if symbol not in self.assets:
            self.assets[symbol] = {
                "id": str(uuid.uuid5(uuid.NAMESPACE_DNS, symbol)), "class": "us_equity",
                "exchange": "NASDAQ", "symbol": symbol, "name": f"{symbol} Inc.",
                "status": "active", "tradable": True, "marginable": True, "shortable": True,
                "easy_to_borrow": True, "fractionable": True,
                "maintenance_margin_requirement": 30, "attributes": []}
        return self.assets[symbol]

    def _price(self, symbol: str) -> Decimal:
        if self.price_source is not None:
            px = self.price_source(symbol)
            if px is not None:
                return px
        return self.prices.get(symbol, Decimal("100"))

    def _stamp(self) -> str:
        return _now_iso(self.now())

    def _event(self, event: str, o: dict[str, Any], qty: int = 0,
               price: Decimal | None = None) -> None:
        pos = self.positions.get(o["symbol"], (0, Decimal(0)))[0]
        data: dict[str, Any] = {"event": event, "order": self._view(o, nested=True),
                                "timestamp": o["updated_at"], "position_qty": str(pos)}
        if event in ("fill", "partial_fill"):
            data.update(execution_id=str(uuid.uuid4()), price=_s(price or Decimal(0)),
                        qty=str(qty))
        msg = {"stream": "trade_updates", "data": data}
        self.events.append(msg)
        if self.stream is not None:
            self.stream.publish(msg)

    def _finish(self, o: dict[str, Any], status: str) -> None:
        if o["status"] not in _WORKING:
            return
        ts = self._stamp()
        o["status"] = status
        o["updated_at"] = ts
        o[{"canceled": "canceled_at", "expired": "expired_at",
           "rejected": "failed_at"}[status]] = ts
        self._event(status, o)
        for leg_id in o.get("_legs", []):
            leg = self.orders[leg_id]
            if leg["status"] == "held":
                self._finish(leg, "canceled")

    def _execute(self, o: dict[str, Any], qty: int, px: Decimal) -> None:
        if qty <= 0:
            return
        filled = int(o["filled_qty"])
        avg = Decimal(o["filled_avg_price"]) if o["filled_avg_price"] else Decimal(0)
        total = filled + qty
        o["filled_avg_price"] = _s(((avg * filled + px * qty) / total).quantize(
            Decimal("0.0001")))
        o["filled_qty"] = str(total)
        ts = self._stamp()
        o["updated_at"] = ts
        done = total >= int(o["qty"])
        o["status"] = "filled" if done else "partially_filled"
        if done:
            o["filled_at"] = ts
        signed = qty if o["side"] == "buy" else -qty
        have, cost = self.positions.get(o["symbol"], (0, Decimal(0)))
        new = have + signed
        if new == 0:
            self.positions.pop(o["symbol"], None)
        elif have == 0 or (have > 0) != (new > 0):
            self.positions[o["symbol"]] = (new, px)
        elif (have > 0) == (signed > 0):
            self.positions[o["symbol"]] = (new, (cost * abs(have) + px * qty) / abs(new))
        else:
            self.positions[o["symbol"]] = (new, cost)
        self._event("fill" if done else "partial_fill", o, qty, px)
        for leg_id in o.get("_legs", []):  # OTO: the stop now protects what filled
            leg = self.orders[leg_id]
            if leg["status"] in ("held", "new"):
                leg["qty"] = str(total)
                if leg["status"] == "held":
                    leg["status"] = "new"
                    leg["updated_at"] = ts
                    self._event("new", leg)

    def _new_order(self, body: dict[str, Any], parent: dict[str, Any] | None = None,
                   ) -> dict[str, Any]:
        ts = self._stamp()
        otype = body.get("type") or body.get("order_type") or "market"
        qty = int(_dec(body["qty"]))
        o = {
            "id": str(uuid.uuid4()),
            "client_order_id": body.get("client_order_id") or str(uuid.uuid4()),
            "created_at": ts, "updated_at": ts, "submitted_at": ts, "filled_at": None,
            "expired_at": None, "canceled_at": None, "failed_at": None, "replaced_at": None,
            "replaced_by": None, "replaces": None,
            "asset_id": self._asset(body["symbol"])["id"], "symbol": body["symbol"],
            "asset_class": "us_equity", "notional": None, "qty": str(qty), "filled_qty": "0",
            "filled_avg_price": None,
            "order_class": body.get("order_class") or ("" if parent is None else "oto"),
            "order_type": otype, "type": otype, "side": body["side"],
            "time_in_force": body.get("time_in_force", "day"),
            "limit_price": _s(_dec(body["limit_price"])) if body.get("limit_price") else None,
            "stop_price": _s(_dec(body["stop_price"])) if body.get("stop_price") else None,
            "status": "held" if parent is not None else "new",
            "extended_hours": bool(body.get("extended_hours")),
            "legs": None, "trail_percent": None, "trail_price": None, "hwm": None,
            "_legs": [], "_parent": parent["id"] if parent else None,
        }
        self.orders[o["id"]] = o
        return o

    def _view(self, o: dict[str, Any], nested: bool = True) -> dict[str, Any]:
        out = {k: v for k, v in o.items() if not k.startswith("_")}
        if nested and o["_legs"]:
            out["legs"] = [self._view(self.orders[i], nested=False) for i in o["_legs"]]
        return out

    def _marketable(self, o: dict[str, Any]) -> Decimal | None:
        px = self._price(o["symbol"])
        if o["type"] == "market":
            return px
        if o["type"] == "limit":
            lim = Decimal(o["limit_price"])
            if (o["side"] == "buy" and px <= lim) or (o["side"] == "sell" and px >= lim):
                return px
        return None

    def _work(self, o: dict[str, Any]) -> None:
        """What happens to a new order right after it is accepted."""
        if self.fill_mode == "none":
            return
        px = self._marketable(o)
        if px is not None:
            qty = int(o["qty"])
            if self.fill_mode == "partial":
                qty = self.partial_qty or max(1, qty // 2)
            self._execute(o, min(qty, int(o["qty"])), px)
        if o["time_in_force"] in ("ioc", "fok") and o["status"] in _WORKING:
            self._finish(o, "canceled")

    # -- REST ---------------------------------------------------------------------------------
    def handle(self, method: str, path: str, query: dict[str, str], body: Any,
               ) -> tuple[int, Any]:
        """One request -> (status, JSON body or None)."""
        seen = Seen(time.monotonic(), method, path, query, body)
        with self.lock:
            self.requests.append(seen)
            fault = next((f for f in self.faults if f.matches(method, path)), None)
            if fault is not None and fault.times is not None:
                fault.times -= 1
                if fault.times <= 0:
                    self.faults.remove(fault)
        if fault is not None and fault.delay_s:
            time.sleep(fault.delay_s)
        if fault is not None and fault.status is not None:
            seen.status = fault.status
            code = fault.code or {403: 40310000, 422: 40010001, 429: 42910000,
                                  404: 40410000}.get(fault.status, 50010000)
            return fault.status, {"code": code, "message": fault.message, **fault.extra}
        with self.lock:
            status, out = self._route(method, path, query, body)
        seen.status = status
        return status, out

    def _route(self, method: str, path: str, q: dict[str, str], body: Any) -> tuple[int, Any]:
        if path == "/v2/account" and method == "GET":
            return 200, dict(self.account)
        if path == "/v2/clock" and method == "GET":
            return 200, self._clock()
        if path == "/v2/calendar" and method == "GET":
            return 200, self._calendar(q)
        m = re.fullmatch(r"/v2/assets/([^/]+)", path)
        if m and method == "GET":
            sym = unquote(m.group(1))
            if sym in self.assets or re.fullmatch(r"[A-Z][A-Z0-9.]{0,9}", sym):
                return 200, dict(self._asset(sym))
            return 404, {"code": 40410000, "message": "asset not found"}
        if path == "/v2/positions":
            if method == "GET":
                return 200, [self._position_json(s) for s in sorted(self.positions)]
            if method == "DELETE":
                return self._close_all(q.get("cancel_orders") in ("true", "True", "1"))
        m = re.fullmatch(r"/v2/positions/([^/]+)", path)
        if m:
            sym = unquote(m.group(1))
            if sym not in self.positions:
                return 404, {"code": 40410000, "message": "position does not exist"}
            if method == "GET":
                return 200, self._position_json(sym)
            if method == "DELETE":
                return self._close(sym)
        if path == "/v2/orders":
            if method == "POST":
                return self._submit(body or {})
            if method == "GET":
                return 200, self._list(q)
            if method == "DELETE":
                out = []
                for o in list(self.orders.values()):
                    if o["status"] in _WORKING and o["_parent"] is None:
                        self._finish(o, "canceled")
                        out.append({"id": o["id"], "status": 200, "body": None})
                return 207, out
        if path == "/v2/orders:by_client_order_id" and method == "GET":
            coid = q.get("client_order_id", "")
            for o in self.orders.values():
                if o["client_order_id"] == coid:
                    return 200, self._view(o)
            return 404, {"code": 40410000, "message": "order not found"}
        m = re.fullmatch(r"/v2/orders/([0-9a-f-]{36})", path)
        if m:
            o = self.orders.get(m.group(1))
            if o is None:
                return 404, {"code": 40410000, "message": "order not found"}
            if method == "GET":
                return 200, self._view(o, nested=q.get("nested") in ("true", "True"))
            if method == "DELETE":
                if o["status"] not in _WORKING:
                    return 422, {"code": 42210000, "message": "order is not cancelable"}
                self._finish(o, "canceled")
                return 204, None
        return 404, {"code": 40410000, "message": f"endpoint not found: {method} {path}"}

    def _clock(self) -> dict[str, Any]:
        from core.calendar import NY

        now = self.now().astimezone(NY)
        day = now.date()
        open_ = dt.datetime.combine(day, dt.time(9, 30), tzinfo=NY)
        close = dt.datetime.combine(day, dt.time(16, 0), tzinfo=NY)
        nxt = day + dt.timedelta(days=1)
        while nxt.weekday() >= 5:
            nxt += dt.timedelta(days=1)
        next_open = open_ if now < open_ else dt.datetime.combine(nxt, dt.time(9, 30), tzinfo=NY)
        next_close = close if now < close else dt.datetime.combine(nxt, dt.time(16, 0),
                                                                   tzinfo=NY)
        return {"timestamp": now.isoformat(), "is_open": self.market_open,
                "next_open": next_open.isoformat(), "next_close": next_close.isoformat()}

    def _calendar(self, q: dict[str, str]) -> list[dict[str, Any]]:
        from core.calendar import session_bounds, sessions_between

        start = dt.date.fromisoformat(q.get("start", "2024-06-03")[:10])
        end = dt.date.fromisoformat(q.get("end", q.get("start", "2024-06-07"))[:10])
        out = []
        for d in sessions_between(start, end):
            o, c = session_bounds(d)
            out.append({"date": d.isoformat(), "open": o.strftime("%H:%M"),
                        "close": c.strftime("%H:%M"), "session_open": "0400",
                        "session_close": "2000", "settlement_date": (
                            d + dt.timedelta(days=1)).isoformat()})
        return out

    def _position_json(self, sym: str) -> dict[str, Any]:
        qty, avg = self.positions[sym]
        px = self._price(sym)
        held = sum(int(o["qty"]) - int(o["filled_qty"]) for o in self.orders.values()
                   if o["symbol"] == sym and o["status"] in ("new", "accepted",
                                                             "partially_filled")
                   and (o["side"] == "sell") == (qty > 0))
        avail = abs(qty) - held
        value = px * qty
        return {
            "asset_id": self._asset(sym)["id"], "symbol": sym, "exchange": "NASDAQ",
            "asset_class": "us_equity", "asset_marginable": True, "qty": str(qty),
            "qty_available": str(avail if qty > 0 else -avail),
            "avg_entry_price": _s(avg), "side": "long" if qty > 0 else "short",
            "market_value": _s(value), "cost_basis": _s(avg * qty),
            "unrealized_pl": _s((px - avg) * qty), "unrealized_plpc": "0",
            "unrealized_intraday_pl": _s((px - avg) * qty), "unrealized_intraday_plpc": "0",
            "current_price": _s(px), "lastday_price": _s(px), "change_today": "0"}

    def _list(self, q: dict[str, str]) -> list[dict[str, Any]]:
        status = q.get("status", "open")
        nested = q.get("nested") in ("true", "True")
        after = _parse_ts(q["after"]) if q.get("after") else None
        until = _parse_ts(q["until"]) if q.get("until") else None
        symbols = set(q["symbols"].split(",")) if q.get("symbols") else None
        out = []
        for o in self.orders.values():
            if nested and o["_parent"] is not None:
                continue
            working = o["status"] in _WORKING
            if (status == "open" and not working) or (status == "closed" and working):
                continue
            sub = _parse_ts(o["submitted_at"])
            if (after and sub <= after) or (until and sub >= until):
                continue
            if symbols and o["symbol"] not in symbols:
                continue
            if q.get("side") and o["side"] != q["side"]:
                continue
            out.append(self._view(o, nested=nested))
        if q.get("direction", "desc") == "desc":
            out.reverse()
        return out[:int(q.get("limit", 50))]

    def _reject(self, status: int, message: str, **extra: Any) -> tuple[int, Any]:
        return status, {"code": 40310000 if status == 403 else 40010001, "message": message,
                        **extra}

    def _submit(self, body: dict[str, Any]) -> tuple[int, Any]:
        coid = body.get("client_order_id")
        if coid and any(o["client_order_id"] == coid for o in self.orders.values()):
            return self._reject(422, "client_order_id must be unique")
        sym = body.get("symbol", "")
        if not re.fullmatch(r"[A-Z][A-Z0-9.]{0,9}", sym):
            return self._reject(422, f'asset "{sym}" not found')
        asset = self._asset(sym)
        if not asset["tradable"]:
            return self._reject(422, f"asset {sym} is not tradable")
        qty = int(_dec(body["qty"]))
        side = body["side"]
        have = self.positions.get(sym, (0, Decimal(0)))[0]
        if body.get("order_class") in ("oto", "bracket") and body.get("time_in_force") not in (
                "day", "gtc"):
            return self._reject(422, "invalid time_in_force for bracket/oto orders")
        for o in self.orders.values():
            if (o["symbol"] == sym and o["side"] != side and o["status"] in _WORKING
                    and o["type"] in ("market", "limit") and o["_parent"] is None):
                return self._reject(403, "potential wash trade detected. use complex orders")
        if side == "sell" and have <= 0:
            if not asset["shortable"] or not asset["easy_to_borrow"]:
                return self._reject(403, f"asset {sym} cannot be sold short")
            if not self.account["shorting_enabled"]:
                return self._reject(403, "account is not allowed to short")
        if (side == "sell" and have > 0) or (side == "buy" and have < 0):
            avail = int(self._position_json(sym)["qty_available"])
            if qty > abs(avail):
                return self._reject(
                    403, f"insufficient qty available for order (requested: {qty}, "
                    f"available: {abs(avail)})")
        opening = (side == "buy" and have >= 0) or (side == "sell" and have <= 0)
        px = Decimal(str(body["limit_price"])) if body.get("limit_price") else self._price(sym)
        if opening and px * qty > Decimal(self.account["buying_power"]):
            return self._reject(403, "insufficient buying power",
                                buying_power=self.account["buying_power"],
                                cost_basis=_s(px * qty))
        o = self._new_order(body)
        if body.get("stop_loss"):
            sl = body["stop_loss"]
            leg = self._new_order({
                "symbol": sym, "qty": qty, "side": "sell" if side == "buy" else "buy",
                "type": "stop", "time_in_force": body.get("time_in_force", "day"),
                "stop_price": sl["stop_price"]}, parent=o)
            o["_legs"].append(leg["id"])
        self._event("new", o)
        self._work(o)
        return 200, self._view(o)

    def _close(self, sym: str) -> tuple[int, Any]:
        qty = self.positions[sym][0]
        o = self._new_order({"symbol": sym, "qty": abs(qty), "type": "market",
                             "side": "sell" if qty > 0 else "buy", "time_in_force": "day"})
        self._event("new", o)
        self._work(o)
        return 200, self._view(o)

    def _close_all(self, cancel: bool) -> tuple[int, Any]:
        if cancel:
            for o in list(self.orders.values()):
                if o["status"] in _WORKING:
                    self._finish(o, "canceled")
        out = []
        for sym in sorted(self.positions):
            status, o = self._close(sym)
            out.append({"symbol": sym, "status": status, "order_id": o["id"], "body": o})
        return 207, out


class ReplayPrices:
    """A ``price_source`` for FakeAlpaca: each symbol's close at the replay's current bar (the
    last bar the replay clock published), read from Redis through a ``RedisReplay``, so the
    server's market follows a replay that worker processes drive. Before the first bar, or
    where the bar has no usable close, the last usable close seen (None before any)."""

    def __init__(self, replay: Any) -> None:
        self._replay = replay
        self._at: tuple[dt.date, int] | None = None
        self._last: dict[str, Decimal] = {}
        self._lock = threading.Lock()

    def __call__(self, symbol: str) -> Decimal | None:
        from core.models import CLOSE

        with self._lock:
            meta, bar = self._replay.now()
            if meta is not None and bar >= 0 and self._at != (meta.date, bar):
                row = self._replay.row(meta, bar)
                for sym, px in zip(meta.symbols, row[:, CLOSE], strict=True):
                    if px == px and px > 0:  # NaN (a missing bar) or zero: keep the last
                        self._last[sym] = Decimal(f"{px:.2f}")
                self._at = (meta.date, bar)
            return self._last.get(symbol)

    def now(self) -> dt.datetime:
        """The replay clock (for ``FakeAlpaca.now``): see ``core.runtime.replay_time``."""
        from core.runtime import replay_time

        return replay_time(self._replay)


class _Handler(BaseHTTPRequestHandler):
    fake: FakeAlpaca
    protocol_version = "HTTP/1.1"
    # headers and body go out in two writes: without TCP_NODELAY, Nagle's algorithm and the
    # client's delayed ACK hold the body ~40 ms, on every keep-alive request
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _do(self, method: str) -> None:
        url = urlparse(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else None
        if self.headers.get("APCA-API-KEY-ID") != self.fake.key or \
                self.headers.get("APCA-API-SECRET-KEY") != self.fake.secret:
            status, out = 401, {"code": 40110000, "message": "request is not authorized"}
        else:
            try:
                status, out = self.fake.handle(method, url.path, query, body)
            except Exception as exc:  # a bug in the fake: answer 500 and say what
                status, out = 500, {"code": 50010000, "message": f"fake error: {exc!r}"}
        data = b"" if out is None else json.dumps(out).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the client gave up (timeout) before the answer
            pass

    def do_GET(self) -> None:
        self._do("GET")

    def do_POST(self) -> None:
        self._do("POST")

    def do_DELETE(self) -> None:
        self._do("DELETE")

    def do_PATCH(self) -> None:
        self._do("PATCH")
