"""One bar file to clean rows: parsing, the row checks (the trading calendar's among them)
and, for many files, forked readers that parse while the caller builds the calendar.

The file format is described in ``core.market.files``. A bad row is dropped, never used:
each file with problems gets ONE warning on this module's logger that counts them by
reason (logger ``core.market.files``); a file that cannot be used at all raises
``BarDataError``.
"""

from __future__ import annotations

import gzip as _gzip
import io
import logging
import os
import re
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core.calendar import NY, session_table_ns
from core.errors import BarDataError
from core.models import CLOSE, HIGH, LOW, OPEN, VOLUME

# the per-file warnings keep the logger they always had (operators filter on it)
log = logging.getLogger("core.market.files")

HEADER = ("timestamp", "symbol", "open", "high", "low", "close", "volume")
_HEADER_LINE = ",".join(HEADER)
# An explicit UTC offset (or Z) at the end of an ISO-8601 timestamp.
_OFFSET_RE = r"(?:[Zz]|[+-]\d{2}:?\d{2})$"
_NS_PER_S = 1_000_000_000
_NS_PER_DAY = 86_400 * _NS_PER_S
_EARLIEST = pd.Timestamp("1900-01-01", tz="UTC")
_LATEST = pd.Timestamp("2200-01-01", tz="UTC")
# A file whose aligned bars all sit on a coarser grid than its name says is only called a
# bar-size mismatch when it has at least this many distinct bar slots (thin data is not).
_MIN_SLOTS_FOR_SPACING_CHECK = 8

# Drop reasons, in the order the rules are applied (a row counts under the first it fails).
_REASONS = (
    "malformed_line",
    "symbol_mismatch",
    "bad_timestamp",
    "no_offset",
    "non_session_date",
    "outside_session",
    "misaligned",
    "bad_price",
    "bad_ohlc",
    "bad_volume",
    "duplicate",
)


@dataclass(frozen=True)
class SymbolRows:
    """Clean rows of one file, sorted by time: NY day number, bar slot, OHLCV values."""

    day: np.ndarray  # int64 days since 1970-01-01 of the New York session date
    slot: np.ndarray  # int64 bar index from the session open
    values: np.ndarray  # float64 [n, 5]


def _read_text(path: Path) -> str:
    """Whole file as text; gzip is recognised by its magic bytes, not by the name."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = _gzip.decompress(raw)
        return raw.decode("utf-8-sig")
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
        raise BarDataError(f"cannot read bar file {path}: {exc}") from exc


_TYPED = {"timestamp": str, "symbol": str, "open": np.float64, "high": np.float64,
          "low": np.float64, "close": np.float64, "volume": np.float64}


def read_symbol_file(path: Path, symbol: str, bar_seconds: int) -> SymbolRows:
    """Parse and clean one bar file; row problems are dropped and logged once per file."""
    return _finish_symbol_file(_parse_symbol_file(path, symbol, bar_seconds),
                               session_table_ns().get)


@dataclass
class _Parsed:
    """One file after the checks that need no calendar (``_parse_symbol_file``); the drops
    that follow are applied by ``_finish_symbol_file`` in the same order as always, so a row
    is counted under the first reason that applies."""

    path: Path
    symbol: str
    bar_seconds: int
    n_lines: int
    counts: dict[str, int]
    keep: np.ndarray
    ns: np.ndarray  # UTC ns of each row (0 where the timestamp is unusable)
    day: np.ndarray  # New York day number of each row
    ts_ok: np.ndarray  # rows with a usable timestamp when the calendar is consulted
    values: np.ndarray  # float64 [n, 5], NaN where a cell is not a number


def _parse_symbol_file(path: Path, symbol: str, bar_seconds: int) -> _Parsed:
    """Read one bar file and apply the checks that need no trading calendar."""
    text = _read_text(path)
    lines = text.splitlines()
    if not lines or lines[0].strip() != _HEADER_LINE:
        got = lines[0].strip() if lines else "<empty file>"
        raise BarDataError(f"bar file {path} has header {got!r}, expected {_HEADER_LINE!r}")
    n_lines = sum(map(bool, map(str.strip, lines[1:])))  # non-blank data lines
    numbers: np.ndarray | None = None
    try:
        # fast path: every price and volume cell parses as a number in the C parser
        df = pd.read_csv(io.StringIO(text), dtype=_TYPED, keep_default_na=False,
                         na_filter=False, on_bad_lines="skip", skipinitialspace=True)
        numbers = np.stack([df[name].to_numpy(dtype=np.float64) for name in HEADER[2:]],
                           axis=1)
    except (pd.errors.ParserError, ValueError, TypeError):
        try:  # a cell that is not a number: every cell as text, bad ones become NaN below
            df = pd.read_csv(
                io.StringIO(text),
                dtype=str,
                keep_default_na=False,
                na_filter=False,
                on_bad_lines="skip",
                skipinitialspace=True,
            )
        except (pd.errors.ParserError, ValueError) as exc:
            raise BarDataError(f"cannot parse bar file {path}: {exc}") from exc

    n = len(df)
    counts = dict.fromkeys(_REASONS, 0)
    counts["malformed_line"] = max(n_lines - n, 0)
    keep = np.ones(n, dtype=bool)

    def drop(mask: np.ndarray, reason: str) -> None:
        hit = mask & keep
        counts[reason] += int(hit.sum())
        keep[hit] = False

    sym_col = df["symbol"].to_numpy(dtype=object)
    wrong_symbol = sym_col != symbol
    if wrong_symbol.any():  # slow path only when needed: tolerate surrounding blanks
        wrong_symbol = np.strings.strip(sym_col[wrong_symbol].astype(str)) != symbol
        wrong_symbol = _scatter(n, np.flatnonzero(sym_col != symbol), wrong_symbol)
    drop(wrong_symbol, "symbol_mismatch")

    ts_text = np.strings.strip(df["timestamp"].to_numpy(dtype=object).astype(str))
    parsed = pd.Series(pd.to_datetime(ts_text, format="ISO8601", utc=True, errors="coerce"))
    drop(parsed.isna().to_numpy(dtype=bool), "bad_timestamp")
    drop(~_has_offset(ts_text), "no_offset")

    far = (parsed < _EARLIEST) | (parsed > _LATEST)  # beyond any calendar (and ns range)
    drop(far.to_numpy(dtype=bool), "non_session_date")

    ts_ok = keep.copy()
    ns = np.zeros(n, dtype=np.int64)
    day = np.zeros(n, dtype=np.int64)
    if ts_ok.any():
        good = parsed[ts_ok].dt.as_unit("ns")
        ns[ts_ok] = good.dt.tz_convert(None).to_numpy(dtype="datetime64[ns]").view(np.int64)
        local = good.dt.tz_convert(NY).dt.tz_localize(None)
        day[ts_ok] = local.to_numpy(dtype="datetime64[ns]").view(np.int64) // _NS_PER_DAY

    if numbers is not None:
        values = numbers
    else:
        values = np.empty((n, 5), dtype=np.float64)
        for j, name in enumerate(HEADER[2:]):
            values[:, j] = _to_float(df[name])
    return _Parsed(path=path, symbol=symbol, bar_seconds=bar_seconds, n_lines=n_lines,
                   counts=counts, keep=keep, ns=ns, day=day, ts_ok=ts_ok, values=values)


def _finish_symbol_file(pf: _Parsed,
                        sessions: Callable[[int], tuple[int, int] | None]) -> SymbolRows:
    """The calendar's checks and the rest of the cleaning; ``sessions`` maps a New York day
    number to the session's (open, close) in UTC ns, None on a day without a session."""
    path, symbol, bar_seconds, n_lines = pf.path, pf.symbol, pf.bar_seconds, pf.n_lines
    counts, keep, ns, day, ts_ok, values = pf.counts, pf.keep, pf.ns, pf.day, pf.ts_ok, pf.values
    n = len(keep)

    def drop(mask: np.ndarray, reason: str) -> None:
        hit = mask & keep
        counts[reason] += int(hit.sum())
        keep[hit] = False

    open_ns = np.zeros(n, dtype=np.int64)
    close_ns = np.zeros(n, dtype=np.int64)
    in_session_day = np.zeros(n, dtype=bool)
    if ts_ok.any():
        uniq, inverse = np.unique(day[ts_ok], return_inverse=True)
        bounds = [sessions(int(d)) for d in uniq]
        is_sess = np.array([b is not None for b in bounds], dtype=bool)
        opens = np.array([b[0] if b else 0 for b in bounds], dtype=np.int64)
        closes = np.array([b[1] if b else 0 for b in bounds], dtype=np.int64)
        in_session_day[ts_ok] = is_sess[inverse]
        open_ns[ts_ok] = opens[inverse]
        close_ns[ts_ok] = closes[inverse]
    drop(~in_session_day, "non_session_date")
    drop((ns < open_ns) | (ns >= close_ns), "outside_session")

    bar_ns = bar_seconds * _NS_PER_S
    offset = ns - open_ns
    misaligned = offset % bar_ns != 0
    _check_bar_size(path, bar_seconds, offset[keep], misaligned[keep])
    drop(misaligned, "misaligned")

    o, h, lo, c, v = (values[:, j] for j in (OPEN, HIGH, LOW, CLOSE, VOLUME))
    prices = values[:, :4]
    with np.errstate(invalid="ignore"):
        drop(~np.isfinite(prices).all(axis=1) | (prices <= 0).any(axis=1), "bad_price")
        drop((h < lo) | (o < lo) | (o > h) | (c < lo) | (c > h), "bad_ohlc")
        drop(~np.isfinite(v) | (v < 0), "bad_volume")

    idx = np.flatnonzero(keep)
    kept_ns = ns[idx]
    unsorted = bool((np.diff(kept_ns) < 0).any())
    if unsorted:
        idx = idx[np.argsort(kept_ns, kind="stable")]  # stable: the first in the file stays first
        kept_ns = ns[idx]
    dup = np.zeros(len(idx), dtype=bool)
    dup[1:] = kept_ns[1:] == kept_ns[:-1]
    counts["duplicate"] = int(dup.sum())
    idx = idx[~dup]

    dropped = {reason: count for reason, count in counts.items() if count}
    if len(idx) == 0:
        raise BarDataError(
            f"bar file {path} has no usable rows ({n_lines} data lines; dropped: "
            f"{_format_counts(dropped) or 'none'})"
        )
    if dropped or unsorted:
        parts = [f"{path.name}: kept {len(idx)} of {n_lines} rows"]
        if dropped:
            parts.append(f"dropped {sum(dropped.values())} ({_format_counts(dropped)})")
        if unsorted:
            parts.append("rows were not in time order and were sorted")
        log.warning(
            "; ".join(parts),
            extra={"symbol": symbol, "file": str(path), "dropped": dropped, "sorted": unsorted},
        )
    return SymbolRows(day=day[idx], slot=offset[idx] // bar_ns, values=values[idx])


def _scatter(n: int, index: np.ndarray, flags: np.ndarray) -> np.ndarray:
    out = np.zeros(n, dtype=bool)
    out[index] = flags
    return out


def _has_offset(ts_text: np.ndarray) -> np.ndarray:
    """True where a timestamp string ends in an explicit UTC offset (regex on the few tails)."""
    tails, inverse = np.unique(np.strings.slice(ts_text, -6, None), return_inverse=True)
    ok = np.array([re.search(_OFFSET_RE, str(t)) is not None for t in tails], dtype=bool)
    return ok[inverse.reshape(-1)]


def _to_float(column: pd.Series) -> np.ndarray:
    """Column of number strings as float64; anything that is not a number becomes NaN."""
    raw = column.to_numpy(dtype=object)
    try:
        return raw.astype(np.float64)  # fast path: every cell is a number
    except ValueError:
        return pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)


def _format_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{reason}={count}" for reason, count in counts.items())


def _check_bar_size(
    path: Path, bar_seconds: int, offset_ns: np.ndarray, misaligned: np.ndarray
) -> None:
    """Raise BarDataError when the in-session timestamps do not fit the bar size in the name.

    Finer data shows as most rows being off the grid; coarser data as every aligned bar sitting
    on a multiple of k > 1 bars from the open (checked once there are enough distinct slots).
    """
    minutes = bar_seconds // 60
    if len(offset_ns) and 2 * int(misaligned.sum()) > len(offset_ns):
        raise BarDataError(
            f"bar file {path} is named {minutes}min but {int(misaligned.sum())} of "
            f"{len(offset_ns)} in-session timestamps are off the {minutes}-minute grid"
        )
    slots = np.unique(offset_ns[~misaligned] // (bar_seconds * _NS_PER_S))
    slots = slots[slots > 0]
    if len(slots) >= _MIN_SLOTS_FOR_SPACING_CHECK:
        step = int(np.gcd.reduce(slots))
        if step > 1:
            raise BarDataError(
                f"bar file {path} is named {minutes}min but its bars are "
                f"{step * minutes} minutes apart"
            )


_PARALLEL_MIN_FILES = 8


def read_files(jobs: list[tuple[Path, str]], bar_seconds: int,
                meanwhile: Callable[[], object] | None = None) -> list[SymbolRows]:
    """``_read_symbol_file`` over many files, in order, raising the first file's error.

    On several cores (Linux) the files are split over forked worker processes, since parsing
    is CPU-bound; each worker parses its files while this process runs ``meanwhile`` and
    builds the trading calendar (a third of a second), then finishes them with the
    calendar it sends. ``meanwhile`` runs in every case, once."""
    import multiprocessing

    workers = min(os.cpu_count() or 1, len(jobs))
    # a daemonic process (a Celery pool worker preparing a replay on its first tick) may
    # not start children: it reads the files itself
    if (workers < 2 or len(jobs) < _PARALLEL_MIN_FILES or sys.platform != "linux"
            or multiprocessing.current_process().daemon):
        if meanwhile is not None:
            meanwhile()
        return [read_symbol_file(path, symbol, bar_seconds) for path, symbol in jobs]
    ctx = multiprocessing.get_context("fork")
    chunks = [list(range(i, len(jobs), workers)) for i in range(workers)]
    links = []
    for chunk in chunks:
        here, there = ctx.Pipe()
        proc = ctx.Process(target=_read_worker, args=(there, [jobs[i] for i in chunk],
                                                        bar_seconds), daemon=True)
        proc.start()
        there.close()
        links.append((here, proc))
    if meanwhile is not None:
        meanwhile()
    table = session_table_ns()
    out: list[SymbolRows | BaseException | None] = [None] * len(jobs)
    try:
        for here, _ in links:
            here.send(table)
        for chunk, (here, _) in zip(chunks, links, strict=True):
            for i, result in zip(chunk, here.recv(), strict=True):
                out[i] = result
    except (EOFError, OSError):  # a worker died (memory?): read everything here instead
        log.warning("a bar file reader process died; reading the files in this process")
        return [read_symbol_file(path, symbol, bar_seconds) for path, symbol in jobs]
    finally:
        for here, proc in links:
            here.close()
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    for result in out:
        if isinstance(result, BaseException):
            raise result
        if result is None:
            raise BarDataError("a bar file reader stopped without an answer")
    return out  # type: ignore[return-value]


def _read_worker(conn: Any, jobs: list[tuple[Path, str]], bar_seconds: int) -> None:
    """A forked reader: parse, wait for the calendar, finish; one answer per file (rows or
    the error it raised), sent back in order."""
    try:
        parsed: list[_Parsed | BaseException] = []
        for path, symbol in jobs:
            try:
                parsed.append(_parse_symbol_file(path, symbol, bar_seconds))
            except Exception as exc:
                parsed.append(exc)
        table = conn.recv()
        answers: list[SymbolRows | BaseException] = []
        for item in parsed:
            if isinstance(item, BaseException):
                answers.append(item)
                continue
            try:
                answers.append(_finish_symbol_file(item, table.get))
            except Exception as exc:
                answers.append(exc)
        conn.send(answers)
    except (EOFError, OSError):
        pass  # the parent went away
    finally:
        conn.close()
