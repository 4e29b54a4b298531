"""Read and write per-symbol intraday bar files.

Format: one symbol per file, named ``<SYMBOL>_<N>min.csv.gz`` (gzip) or ``<SYMBOL>_<N>min.csv``
(plain), header exactly ``timestamp,symbol,open,high,low,close,volume``. ``timestamp`` is the
bar START as ISO-8601 with its UTC offset (America/New_York, e.g.
``2019-02-11T09:30:00-05:00``); prices are US dollars, volume is shares. Regular session only;
missing bars are absent, never filled.

Loading is strict about files (unreadable, wrong header, no usable row, mixed bar sizes ->
``BarDataError``) and lenient about rows: a bad row is dropped, and each file with problems
gets ONE warning that counts them by reason (``core.market.bar_parse`` reads the files).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from core.calendar import NY, session_bounds
from core.errors import BarDataError
from core.market.bar_parse import HEADER, read_files
from core.models import CLOSE, HIGH, LOW, OPEN, VOLUME, DayBars

log = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^(?P<symbol>.+)_(?P<minutes>[1-9]\d*)min\.csv(?P<gz>\.gz)?$")
_EPOCH = dt.date(1970, 1, 1)


def bar_seconds_of(path: Path) -> int:
    """Bar size in seconds from a bar file name like ``AAPL_1min.csv.gz`` (60)."""
    match = _NAME_RE.match(path.name)
    if match is None:
        raise BarDataError(f"{path} is not named like <SYMBOL>_<N>min.csv[.gz]")
    return int(match["minutes"]) * 60


def list_bar_files(data_dir: Path) -> dict[str, Path]:
    """Map symbol -> bar file in ``data_dir`` (``<SYMBOL>_<N>min.csv[.gz]``), sorted by symbol.

    Other files are ignored. Raises BarDataError when the folder does not exist, holds no bar
    file, or holds two files for one symbol (e.g. ``_1min`` and ``_5min``, or ``.csv`` and
    ``.csv.gz``): bar sizes are never mixed silently.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise BarDataError(f"bar data folder {data_dir} does not exist or is not a folder")
    found: dict[str, list[Path]] = {}
    for path in data_dir.iterdir():
        match = _NAME_RE.match(path.name)
        if match is not None and path.is_file():
            found.setdefault(match["symbol"], []).append(path)
    if not found:
        raise BarDataError(
            f"bar data folder {data_dir} holds no bar files named <SYMBOL>_<N>min.csv[.gz]"
        )
    clashes = {sym: sorted(paths) for sym, paths in found.items() if len(paths) > 1}
    if clashes:
        detail = "; ".join(
            f"{sym}: " + " and ".join(p.name for p in paths)
            for sym, paths in sorted(clashes.items())
        )
        raise BarDataError(
            f"bar data folder {data_dir} has several files for one symbol ({detail}); "
            "keep one bar size per symbol"
        )
    return {sym: found[sym][0] for sym in sorted(found)}


def load_days(
    data_dir: Path,
    symbols: Sequence[str] | None = None,
    start: dt.date | None = None,
    end: dt.date | None = None,
    meanwhile: Callable[[], object] | None = None,
) -> list[DayBars]:
    """Load bar files into one DayBars per NYSE session date, ascending.

    ``meanwhile``: work for this process while forked readers parse the files (the caller's
    next imports, say); it runs once in any case.

    ``symbols`` keeps the given order (all files, sorted, if None). ``start``/``end`` are
    inclusive New York session dates. A day is returned when at least one selected symbol has a
    bar on it; its grid runs from the session open to the calendar close (13:00 ET on early
    closes) in steps of the files' bar size, NaN where a symbol has no bar. Raises BarDataError
    for an unknown symbol, mixed bar sizes, or a file that cannot be used at all.
    """
    data_dir = Path(data_dir)
    files = list_bar_files(data_dir)
    if isinstance(symbols, str):
        symbols = [symbols]
    selected = sorted(files) if symbols is None else list(symbols)
    if not selected:
        raise BarDataError("no symbols selected")
    unknown = [s for s in selected if s not in files]
    if unknown:
        raise BarDataError(
            f"no bar file for {', '.join(unknown)} in {data_dir}; available: {', '.join(files)}"
        )
    if len(set(selected)) != len(selected):
        raise BarDataError(f"symbols listed twice: {selected}")
    if start is not None and end is not None and start > end:
        raise ValueError(f"start {start} is after end {end}")

    sizes = {s: bar_seconds_of(files[s]) for s in selected}
    if len(set(sizes.values())) > 1:
        detail = ", ".join(f"{files[s].name} ({sizes[s] // 60} min)" for s in selected)
        raise BarDataError(f"selected bar files have different bar sizes: {detail}")
    bar_seconds = sizes[selected[0]]

    lo = -(2**62) if start is None else (start - _EPOCH).days
    hi = 2**62 if end is None else (end - _EPOCH).days
    per_day: dict[int, list[tuple[int, np.ndarray, np.ndarray]]] = {}
    rows_of = read_files([(files[s], s) for s in selected], bar_seconds, meanwhile)
    for s_idx, rows in enumerate(rows_of):
        in_range = (rows.day >= lo) & (rows.day <= hi)
        day, slot, values = rows.day[in_range], rows.slot[in_range], rows.values[in_range]
        if len(day) == 0:
            continue
        uniq, first = np.unique(day, return_index=True)  # rows are sorted by time
        bounds = [*first[1:].tolist(), len(day)]
        for d, a, b in zip(uniq.tolist(), first.tolist(), bounds, strict=True):
            per_day.setdefault(d, []).append((s_idx, slot[a:b], values[a:b]))

    if len(per_day) > 1:  # a symbol without any bar on a loaded session is not traded then
        for s_idx, symbol in enumerate(selected):
            missing = [_EPOCH + dt.timedelta(days=d) for d in sorted(per_day)
                       if all(entry[0] != s_idx for entry in per_day[d])]
            if missing:
                shown = ", ".join(m.isoformat() for m in missing[:5])
                more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
                log.info("%s has no bars on %d of %d sessions (%s%s): not traded then",
                            symbol, len(missing), len(per_day), shown, more)
    out: list[DayBars] = []
    n_sym = len(selected)
    for d in sorted(per_day):
        date = _EPOCH + dt.timedelta(days=d)
        open_time, close_time = session_bounds(date)
        n_bars = int((close_time - open_time).total_seconds()) // bar_seconds
        ohlcv = np.full((n_bars, n_sym, 5), np.nan)
        for s_idx, slot, values in per_day[d]:
            ohlcv[slot, s_idx, :] = values
        out.append(
            DayBars(
                date=date,
                symbols=tuple(selected),
                open_time=open_time,
                close_time=close_time,
                bar_seconds=bar_seconds,
                ohlcv=ohlcv,
            )
        )
    return out


def _price_text(prices: np.ndarray) -> np.ndarray:
    """Prices as text with at most 4 decimals and no trailing zeros (``750``, ``749.29``)."""
    text = np.strings.mod("%.4f", np.round(prices, 4))
    return np.strings.rstrip(np.strings.rstrip(text, "0"), ".")


def write_bar_files(days: Sequence[DayBars], out_dir: Path, gzip: bool = True) -> list[Path]:
    """Write ``days`` as one bar file per symbol in ``out_dir``; return the paths written.

    Same format that ``load_days`` reads: bar-start timestamps in America/New_York with offset,
    prices rounded to 4 decimals (US dollars), volume rounded to integer shares. NaN slots are
    skipped; a symbol with no bar at all gets no file. ``gzip`` picks ``.csv.gz`` over ``.csv``.
    Existing files of the same name are replaced; a file for the same symbol under another
    name (bar size or compression) raises BarDataError rather than leaving two.
    """
    if not days:
        return []
    sizes = {d.bar_seconds for d in days}
    if len(sizes) > 1:
        raise ValueError(f"days have different bar sizes {sorted(sizes)}; write them separately")
    bar_seconds = sizes.pop()
    if bar_seconds % 60:
        raise ValueError(f"bar size {bar_seconds} s is not a whole number of minutes")
    ordered = sorted(days, key=lambda d: d.date)
    seen: dict[tuple[dt.date, str], int] = {}
    symbols: dict[str, None] = {}
    for d in ordered:
        for sym in d.symbols:
            if (d.date, sym) in seen:
                raise ValueError(f"{sym} appears twice on {d.date}")
            seen[(d.date, sym)] = 1
            symbols.setdefault(sym, None)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = f"_{bar_seconds // 60}min.csv" + (".gz" if gzip else "")
    existing = {}
    for path in out_dir.iterdir():
        match = _NAME_RE.match(path.name)
        if match is not None:
            existing.setdefault(match["symbol"], []).append(path)

    chunks: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {s: [] for s in symbols}
    for d in ordered:
        stamps = np.array([d.bar_time(i).astimezone(NY).isoformat() for i in range(d.n_bars)])
        present = ~np.isnan(d.ohlcv).any(axis=2)  # [T, S]
        for j, sym in enumerate(d.symbols):
            rows = present[:, j]
            if rows.any():
                chunks[sym].append((stamps[rows], d.ohlcv[rows, j, :]))

    written: list[Path] = []
    for sym, parts in chunks.items():
        if not parts:
            continue
        path = out_dir / f"{sym}{suffix}"
        others = [p for p in existing.get(sym, []) if p.name != path.name]
        if others:
            raise BarDataError(
                f"cannot write {path}: {', '.join(p.name for p in others)} already holds {sym}"
            )
        values = np.concatenate([v for _, v in parts])
        frame = pd.DataFrame(
            {
                "timestamp": np.concatenate([t for t, _ in parts]),
                "symbol": sym,
                "open": _price_text(values[:, OPEN]),
                "high": _price_text(values[:, HIGH]),
                "low": _price_text(values[:, LOW]),
                "close": _price_text(values[:, CLOSE]),
                "volume": np.rint(values[:, VOLUME]).astype(np.int64),
            },
            columns=list(HEADER),
        )
        tmp = path.with_name(path.name + ".tmp")
        compression = {"method": "gzip", "compresslevel": 6, "mtime": 0} if gzip else None
        frame.to_csv(tmp, index=False, compression=compression, lineterminator="\n")
        os.replace(tmp, path)
        written.append(path)
    return written


__all__ = ["HEADER", "bar_seconds_of", "list_bar_files", "load_days", "write_bar_files"]
