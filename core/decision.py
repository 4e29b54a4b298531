"""Turn a bar's signals and marks into order intents (pure; shared by cluster and backtest).

Exits first (stale positions, the end-of-day window, then the scoring step's rule exits,
with the stop-loss checked again here as a safety net), then entries, best confidence
first, each sized by the risk manager against what is left of today's limit. Times are
America/New_York; money in cents.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal

import numpy as np

from core.brokers.base import Position
from core.exits import exit_reason
from core.orders import OrderIntent, entry_client_order_id, exit_client_order_id
from core.risk import RiskLimits, collar_price, position_value_cents, size_position
from core.signals import Signal

log = logging.getLogger(__name__)
MAX_EXIT_ATTEMPTS = 99


@dataclass(frozen=True)
class DecisionParams:
    """Timing and risk settings of the decision step (minutes, cents, fractions)."""

    limits: RiskLimits
    eod_close_minutes_before: int = 10
    no_entry_minutes_before_close: int = 30
    max_position_value_cents: int | None = None


@dataclass(frozen=True)
class DecisionInput:
    """Everything the decision for one bar needs, read from the world beforehand."""

    session_date: dt.date
    bar: int
    decision_time: dt.datetime  # close of the bar (America/New_York)
    close_time: dt.datetime  # the session's real close (early closes included)
    signals: list[Signal]
    marks: dict[str, float]
    positions: dict[str, Position]
    open_order_symbols: frozenset[str]
    entered_today: frozenset[str]  # "SYMBOL:side" (those of the signals suffice)
    used_cents: int
    halted: bool = False
    # exits already used per symbol; a symbol not here counts its position's exit_attempt
    exit_attempts: dict[str, int] = field(default_factory=dict)
    # exits the scoring step found over the bars: symbol -> (reason, entry client order id)
    rule_exits: dict[str, tuple[str, str]] = field(default_factory=dict)
    # the held symbols that may exit at this bar (``exit_candidates``); None: look at all
    exit_candidates: frozenset[str] | None = None


def in_eod_window(decision_time: dt.datetime, close_time: dt.datetime, minutes: int) -> bool:
    """True when ``decision_time`` is within ``minutes`` of the session close."""
    return close_time - decision_time <= dt.timedelta(minutes=minutes)


def decide(inp: DecisionInput, params: DecisionParams) -> list[OrderIntent]:
    """Order intents for this bar: exits, then sized entries."""
    return decide_exits(inp, params) + decide_entries(inp, params)


def decide_exits(inp: DecisionInput, params: DecisionParams) -> list[OrderIntent]:
    """The exits of this bar, by symbol (they depend on nothing the entries decide)."""
    return list(iter_exits(inp, params))


def iter_exits(inp: DecisionInput, params: DecisionParams) -> Iterator[OrderIntent]:
    """``decide_exits`` one at a time (the first can be sent before the others are built).
    Uses the positions, their marks, the working orders, the candidates and the rule exits
    of ``inp`` only: not the signals, the entries taken, the capital used or the halt."""
    eod = in_eod_window(inp.decision_time, inp.close_time, params.eod_close_minutes_before)
    date_s = inp.session_date.isoformat()
    held = (inp.positions if inp.exit_candidates is None
            else inp.exit_candidates.intersection(inp.positions))
    for symbol in sorted(held):
        pos = inp.positions[symbol]
        if symbol in inp.open_order_symbols:
            continue  # an exit (or entry) is already working for this symbol
        reason = exit_reason(pos, inp.marks.get(symbol), params.limits.stop_loss_pct, eod, date_s)
        rule = inp.rule_exits.get(symbol)
        if (reason not in ("stale_position", "eod") and rule is not None
                and rule[1] == pos.entry_client_order_id):
            reason = rule[0]  # peak/trough, ML, stop-loss, take-profit, max hold, in order
        if reason is None:
            continue
        attempt = inp.exit_attempts.get(symbol, pos.exit_attempt) + 1
        if attempt > MAX_EXIT_ATTEMPTS:
            log.error("exit attempts exhausted; needs a person", extra={"symbol": symbol})
            continue
        mark = inp.marks.get(symbol)
        yield OrderIntent(
            client_order_id=exit_client_order_id(pos.entry_client_order_id, attempt),
            symbol=symbol, side="sell" if pos.qty > 0 else "buy", qty=abs(pos.qty),
            intent="exit", reason=reason, strategy=pos.strategy, confidence=pos.confidence,
            ref_price=repr(mark) if mark and math.isfinite(mark) else pos.avg_price,
            session_date=inp.session_date, bar=inp.bar,
        )


def decide_entries(inp: DecisionInput, params: DecisionParams) -> list[OrderIntent]:
    """The sized entries of this bar, best confidence first (none once halted or in the
    no-entry window before the close)."""
    intents: list[OrderIntent] = []
    no_entry = in_eod_window(inp.decision_time, inp.close_time,
                             max(params.no_entry_minutes_before_close,
                                 params.eod_close_minutes_before))
    if inp.halted or no_entry:
        return intents
    remaining = params.limits.daily_limit_cents - inp.used_cents
    # a working entry becomes a position when it fills, so it counts against the cap
    open_count = len(set(inp.positions) | inp.open_order_symbols)
    taken: set[str] = set()
    for sig in sorted(inp.signals, key=lambda s: (-s.confidence, s.symbol, s.side)):
        if open_count >= params.limits.max_open_positions or remaining <= 0:
            break
        if (sig.symbol in inp.positions or sig.symbol in inp.open_order_symbols
                or sig.symbol in taken or f"{sig.symbol}:{sig.side}" in inp.entered_today):
            continue
        price = Decimal(repr(sig.price))
        if not price.is_finite() or price <= 0:
            continue
        price = price.quantize(Decimal("0.0001"))  # the collar maths is exact on this grid
        cap = remaining
        if params.max_position_value_cents is not None:
            cap = min(cap, params.max_position_value_cents)
        qty = size_position(price, params.limits, cap)
        if qty <= 0:
            log.info("entry skipped: size 0", extra={"symbol": sig.symbol,
                                                    "remaining_cents": remaining})
            continue
        limit = collar_price(price, sig.side, params.limits.entry_collar_pct)
        intent = OrderIntent(
            client_order_id=entry_client_order_id(sig.source, sig.symbol, sig.bar_time,
                                                  sig.side),
            symbol=sig.symbol, side=sig.side, qty=qty, intent="entry", reason=sig.source,
            strategy=sig.source, confidence=sig.confidence, ref_price=str(price),
            limit_price=str(limit), session_date=inp.session_date, bar=inp.bar,
        )
        intents.append(intent)
        remaining -= reservation_cents(intent)
        open_count += 1
        taken.add(sig.symbol)
    return intents


def exit_candidates(symbols: list[str], qty: np.ndarray, avg: np.ndarray, stale: np.ndarray,
                    marks: np.ndarray, stop_loss_pct: float, eod: bool,
                    rule_exits: Iterable[str]) -> frozenset[str]:
    """The held symbols that may exit at this bar: a superset of those ``exit_reason`` or a
    rule exit closes (stale ones, every one in the end-of-day window, those with a rule
    exit, and those whose mark is not clearly away from the stop-loss by the same float
    test ``exit_reason`` starts with). ``marks`` per held symbol, NaN: none."""
    if eod:
        return frozenset(symbols)
    with np.errstate(invalid="ignore"):
        level = avg * np.where(qty > 0, 1 - stop_loss_pct, 1 + stop_loss_pct)
        valid = np.isfinite(marks) & (marks > 0) & (qty != 0)
        away = ((qty > 0) & (marks > level * (1 + 1e-9))) | (
            (qty < 0) & (marks < level * (1 - 1e-9)))
    near = stale | (valid & ~away)
    return frozenset([symbols[i] for i in np.flatnonzero(near)]).union(rule_exits)


def reservation_cents(intent: OrderIntent) -> int:
    """Capital to reserve for an entry: quantity x the collar's upper price (cents).

    A buy limit caps the fill at the limit. A short sells at or above its limit, so its
    value is bounded by the mirror of the collar above the reference price instead.
    """
    ref = Decimal(intent.ref_price)
    limit = Decimal(intent.limit_price) if intent.limit_price else ref
    upper = limit if intent.side == "buy" else ref + (ref - limit)
    return position_value_cents(intent.qty, max(upper, ref))
