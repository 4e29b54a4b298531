"""What an operator asks of a running cluster: account, positions with unrealized P/L,
today's realized P/L, used capital vs the limit, halt and breaker state, the last tick and
its stage latencies, the model version, queue depths, order counts. Read from Redis only
(no broker calls), so it is safe to run at any time; also rendered as Prometheus metrics.

Money in cents inside, dollars in the output; times ISO-8601; dates New York session dates.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import time
from decimal import Decimal
from typing import Any

from core.models import CLOSE
from core.money import cents
from core.runtime import Runtime

QUEUES = ("gpu", "exec")


def latest_sim_run(redis: Any) -> str | None:
    """The run id of the most recently active simulated run in this Redis (None: none)."""
    best: tuple[float, str] | None = None
    for key in redis.scan_iter(match="sim:*:replay:state", count=1000):
        run = key.decode().split(":")[1]
        raw = redis.hget(key, "dispatched_at")
        at = float(raw or 0)
        if best is None or at > best[0]:
            best = (at, run)
    return best[1] if best else None


def _marks(rt: Runtime, day: dt.date, bar: int) -> dict[str, float]:
    """Each symbol's latest close up to ``bar`` from the bar store (US dollars)."""
    meta = rt.bar_store.meta(day)
    if meta is None or bar < 0:
        return {}
    rows = rt.bar_store.read(day, 0)[: bar + 1]
    out: dict[str, float] = {}
    for j, sym in enumerate(meta.symbols):
        col = rows[:, j, CLOSE]
        ok = [float(x) for x in col if math.isfinite(x) and x > 0]
        if ok:
            out[sym] = ok[-1]
    return out


def collect(rt: Runtime) -> dict[str, Any]:
    """The status document (JSON-ready)."""
    r = rt.redis
    meta, bar = rt.session_now()
    day = meta.date if meta is not None else dt.datetime.now(tz=dt.UTC).date()
    positions, open_orders = rt.broker.snapshot()
    marks = _marks(rt, day, bar) if meta is not None else {}
    pos_rows = []
    unrealized = 0
    for sym in sorted(positions):
        p = positions[sym]
        mark = marks.get(sym)
        upnl = None
        if mark is not None:
            upnl_cents = cents((Decimal(repr(mark)) - p.avg) * p.qty)
            unrealized += upnl_cents
            upnl = upnl_cents / 100
        pos_rows.append({"symbol": sym, "qty": p.qty, "avg_price": p.avg_price, "mark": mark,
                         "unrealized_pnl": upnl, "strategy": p.strategy,
                         "opened_at": p.opened_at, "stop_price": p.stop_price})
    orders = rt.broker.all_orders()
    by_status: dict[str, int] = {}
    for o in orders:
        by_status[o.status] = by_status.get(o.status, 0) + 1
    last = {k.decode(): v.decode() for k, v in r.hgetall(rt.keys.k("tick:last")).items()}
    halt_raw = r.get(rt.keys.halt())
    breaker = rt.breaker.state()
    from ml.registry import read_current

    try:
        current = read_current(rt.settings.model_dir)
    except Exception as exc:  # a broken pointer is itself a status to show
        current = f"unreadable: {exc}"
    cash = rt.broker.cash_cents()
    value = sum(cents(Decimal(repr(marks[s])) * p.qty if s in marks else p.avg * p.qty)
                for s, p in positions.items())
    realized = rt.broker.realized_pnl_cents(day)
    return {
        "mode": rt.settings.mode,
        "namespace": rt.keys.prefix or "(live keys)",
        "session": {"date": day.isoformat(), "bar": bar,
                    "bar_time": meta.bar_time(bar).isoformat() if meta and bar >= 0 else None,
                    "status": rt.replay.state().status if rt.settings.mode == "sim" else None},
        "account": {"cash": cash / 100, "equity": (cash + value) / 100},
        "positions": pos_rows,
        "open_orders": [{"client_order_id": o.client_order_id, "symbol": o.symbol,
                         "side": o.side, "qty": o.qty, "filled_qty": o.filled_qty,
                         "status": o.status} for o in open_orders],
        "pnl": {"realized_today": realized / 100, "unrealized": unrealized / 100},
        "capital": {"used": rt.limits.used(day) / 100, "peak": rt.limits.peak(day) / 100,
                    "limit": rt.settings.daily_limit_cents / 100},
        "halt": {"kill_switch": json.loads(halt_raw) if halt_raw else None,
                 "loss_halt": bool(r.exists(rt.keys.loss_halt(day)))},
        "breaker": {"state": breaker.state, "failures": breaker.failures,
                    "retry_at": breaker.retry_at},
        "last_tick": {
            "date": last.get("date"), "bar": int(last["bar"]) if "bar" in last else None,
            "age_s": round(time.time() - float(last["tick_at"]), 3)
            if float(last.get("tick_at", 0) or 0) > 0 else None,
            "latency_ms": {k: float(last[k]) for k in
                           ("score_queue_ms", "score_ms", "decide_queue_ms") if k in last},
            "signals": int(last["signals"]) if "signals" in last else None},
        "model": {"current": current, "last_tick": last.get("model") or None},
        "queues": {q: int(r.llen(q)) for q in QUEUES},
        "orders": {"total": len(orders), **dict(sorted(by_status.items()))},
        "trades": len(rt.broker.trades()),
    }


def render_text(doc: dict[str, Any]) -> str:
    """A human-readable status screen."""
    s, a, c, t = doc["session"], doc["account"], doc["capital"], doc["last_tick"]
    lines = [
        f"mode {doc['mode']}  {doc['namespace']}  session {s['date']} bar {s['bar']} "
        f"({s['bar_time'] or '-'}) {s['status'] or ''}".rstrip(),
        f"account  cash {a['cash']:,.2f}  equity {a['equity']:,.2f}",
        f"P/L      realized today {doc['pnl']['realized_today']:,.2f}  unrealized "
        f"{doc['pnl']['unrealized']:,.2f}",
        f"capital  used {c['used']:,.2f} of {c['limit']:,.2f} (peak {c['peak']:,.2f})",
        f"halt     kill switch {'ON' if doc['halt']['kill_switch'] else 'off'}  loss halt "
        f"{'ON' if doc['halt']['loss_halt'] else 'off'}  breaker {doc['breaker']['state']} "
        f"({doc['breaker']['failures']} failures)",
        f"tick     bar {t['bar']} age {t['age_s']} s  latency ms "
        + "  ".join(f"{k} {v:.1f}" for k, v in t["latency_ms"].items()),
        f"model    current {doc['model']['current'] or '-'}  last tick "
        f"{doc['model']['last_tick'] or 'rules only'}",
        "queues   " + "  ".join(f"{q} {n}" for q, n in doc["queues"].items()),
        "orders   " + "  ".join(f"{k} {v}" for k, v in doc["orders"].items())
        + f"  trades {doc['trades']}",
        f"positions ({len(doc['positions'])})",
    ]
    for p in doc["positions"]:
        upnl = "-" if p["unrealized_pnl"] is None else f"{p['unrealized_pnl']:,.2f}"
        lines.append(f"  {p['symbol']:<6} {p['qty']:>7}  avg {p['avg_price']:>10}  mark "
                     f"{p['mark'] if p['mark'] is not None else '-':>10}  u P/L {upnl}")
    return "\n".join(lines)


def render_prometheus(doc: dict[str, Any]) -> str:
    """The status as Prometheus text exposition (gauges; money in US dollars)."""
    out: list[str] = []

    def gauge(name: str, value: Any, help_: str, labels: str = "") -> None:
        if value is None:
            return
        if not any(line.startswith(f"# HELP {name} ") for line in out):
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} gauge")
        out.append(f"{name}{labels} {float(value)}")

    gauge("daytrader_equity_dollars", doc["account"]["equity"], "account equity")
    gauge("daytrader_cash_dollars", doc["account"]["cash"], "account cash")
    gauge("daytrader_realized_pnl_dollars", doc["pnl"]["realized_today"], "realized P/L today")
    gauge("daytrader_unrealized_pnl_dollars", doc["pnl"]["unrealized"], "unrealized P/L")
    gauge("daytrader_used_capital_dollars", doc["capital"]["used"], "used capital today")
    gauge("daytrader_daily_limit_dollars", doc["capital"]["limit"], "daily position limit")
    gauge("daytrader_open_positions", len(doc["positions"]), "open positions")
    gauge("daytrader_halted", 1 if doc["halt"]["kill_switch"] else 0, "kill switch on")
    gauge("daytrader_loss_halted", 1 if doc["halt"]["loss_halt"] else 0, "loss limit halt")
    gauge("daytrader_breaker_open", 0 if doc["breaker"]["state"] == "closed" else 1,
          "circuit breaker open or half-open")
    for stage, ms in doc["last_tick"]["latency_ms"].items():
        gauge("daytrader_tick_stage_ms", ms, "last tick's stage latency",
              f'{{stage="{stage}"}}')
    gauge("daytrader_last_tick_age_seconds", doc["last_tick"]["age_s"], "age of the last tick")
    for q, n in doc["queues"].items():
        gauge("daytrader_queue_depth", n, "messages waiting", f'{{queue="{q}"}}')
    for status, n in doc["orders"].items():
        gauge("daytrader_orders", n, "orders by status", f'{{status="{status}"}}')
    gauge("daytrader_trades", doc["trades"], "closed round trips")
    return "\n".join(out) + "\n"
