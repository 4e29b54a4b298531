"""Held positions as arrays over one session's universe, kept from bar to bar (pure).

Scoring (exits) and the decision (marks, the stop-loss safety net, the loss limit) look at
every held position at every bar: hundreds of them at a large universe. ``HeldColumns``
keeps what they need per column of the session's universe (the symbol's index in its bars)
and updates only the positions that changed, as the broker's copy of the positions reports
them (``book_changes``), so a bar costs array operations instead of a Python step per
position. Positions in symbols outside the universe (another session's leftovers) are kept
aside. Prices US dollars; bars are the session's bar indexes.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

import numpy as np

from core.brokers.base import Position
from core.models import symbol_index


def entry_offset(opened_at: str, open_time: dt.datetime, bar_seconds: int) -> int | None:
    """Bar index of the session opening at ``open_time`` that ``opened_at`` (ISO-8601) falls
    in, not capped at the current bar; None before the open or for an unreadable time."""
    try:
        opened = dt.datetime.fromisoformat(opened_at)
    except (TypeError, ValueError):
        return None
    if opened.tzinfo is None:
        return None
    offset = (opened - open_time).total_seconds()
    if offset < 0:
        return None
    return int(offset // bar_seconds)


class HeldColumns:
    """Per column of the universe: signed quantity (0: none), average price, the entry bar
    in this session (-1: none or another session's position), whether the position is of
    this session, its entry order id and a position id (the same while the entry order id
    is; the peak/trough tracker keys its state by it)."""

    def __init__(self) -> None:
        self._key: tuple[object, ...] | None = None
        self._cursor: tuple[int, int] | None = None
        self._next_pid = 1

    def sync(self, positions: dict[str, Position], symbols: tuple[str, ...],
             open_time: dt.datetime, bar_seconds: int, session_date: str,
             changes: Iterable[str] | None = None) -> HeldColumns:
        """Bring the arrays up to ``positions``: only the symbols in ``changes`` are read
        again; None (or another session or universe) reads them all. Returns self."""
        key = (open_time, bar_seconds, session_date)
        if changes is None or self._key is None or self._key[0] is not symbols \
                or self._key[1:] != key:
            self._reset(symbols, key)
            changes = positions.keys()
        for sym in set(changes):
            self._set(sym, positions.get(sym))
        return self

    def sync_from(self, broker: object, positions: dict[str, Position],
                  symbols: tuple[str, ...], open_time: dt.datetime, bar_seconds: int,
                  session_date: str) -> HeldColumns:
        """``sync`` with the changes a broker reports for its copy of the positions
        (``book_changes``); a broker without one has every position read."""
        feed = getattr(broker, "book_changes", None)
        changes = None
        if feed is not None:
            self._cursor, changes = feed(self._cursor)
        return self.sync(positions, symbols, open_time, bar_seconds, session_date, changes)

    def _reset(self, symbols: tuple[str, ...], key: tuple[object, ...]) -> None:
        n = len(symbols)
        self._key = (symbols, *key)
        self.symbols = symbols
        self._index = symbol_index(symbols)
        self.qty = np.zeros(n)
        self.avg = np.zeros(n)
        self.entry = np.full(n, -1, dtype=np.int64)
        self.today = np.zeros(n, dtype=bool)
        self.pid = np.zeros(n, dtype=np.int64)
        self.coid: list[str | None] = [None] * n
        self.outside: dict[str, Position] = {}  # held symbols not in the universe

    def _set(self, sym: str, pos: Position | None) -> None:
        i = self._index.get(sym)
        if i is None:
            if pos is None or pos.qty == 0:
                self.outside.pop(sym, None)
            else:
                self.outside[sym] = pos
            return
        if pos is None or pos.qty == 0:
            self.qty[i] = 0.0
            self.avg[i] = 0.0
            self.entry[i] = -1
            self.today[i] = False
            self.coid[i] = None
            return
        open_time, bar_seconds, session_date = self._key[1:]  # type: ignore[index]
        today = pos.session_date == session_date
        offset = entry_offset(pos.opened_at, open_time, bar_seconds) if today else None
        self.qty[i] = pos.qty
        self.avg[i] = pos.avg_float
        self.entry[i] = -1 if offset is None else offset
        self.today[i] = today
        if self.coid[i] != pos.entry_client_order_id:  # another position in this column
            self.coid[i] = pos.entry_client_order_id
            self.pid[i] = self._next_pid
            self._next_pid += 1

    def held(self) -> np.ndarray:
        """Columns with an open position."""
        return np.flatnonzero(self.qty != 0)
