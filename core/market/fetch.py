"""``daytrader fetch-bars``: download 1-minute regular-session bars into the project's bar files.

The files are those ``core.market.files`` reads (``SYMBOL_1min.csv.gz``, bar-start timestamps
with the New York offset), so they feed ``daytrader sim --data``, ``backtest`` and ``train``
directly. Bars outside the regular session (pre-market, after-hours, past an early close) are
dropped; minutes without a trade are simply absent. Prices are written with 4 decimals and
volume in whole shares (the files' format).
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.calendar import session_bounds, sessions_between
from core.errors import ConfigError
from core.market.feed import BAR_SECONDS, HistoricalSource, MarketDataUnavailable, to_ms
from core.market.files import write_bar_files
from core.models import DayBars

log = logging.getLogger(__name__)

SOURCES = ("polygon", "alpaca")


@dataclass
class FetchSummary:
    """What ``fetch_bars`` wrote."""

    sessions: int = 0
    files: list[Path] = field(default_factory=list)
    bars: dict[str, int] = field(default_factory=dict)  # symbol -> bars written
    no_data: list[str] = field(default_factory=list)  # symbols without any bar


def make_history(source: str, settings: Any = None, *, api_key: str | None = None,
                 secret_key: str | None = None, base_url: str | None = None,
                 timeout_s: float = 30.0) -> HistoricalSource:
    """A historical source from explicit credentials, or from the settings."""
    if source == "polygon":
        from core.market.polygon_feed import DEFAULT_REST_URL, PolygonHistory

        if api_key is None and settings is not None and settings.polygon_api_key is not None:
            api_key = settings.polygon_api_key.get_secret_value()
        if not api_key:
            raise ConfigError("fetch-bars --source polygon needs TRADING_POLYGON_API_KEY")
        url = base_url or getattr(settings, "polygon_rest_url", None) or DEFAULT_REST_URL
        return PolygonHistory(api_key, url, timeout_s=timeout_s)
    if source == "alpaca":
        from core.market.alpaca_data import AlpacaHistory

        if settings is not None:
            if api_key is None and settings.alpaca_api_key is not None:
                api_key = settings.alpaca_api_key.get_secret_value()
            if secret_key is None and settings.alpaca_secret_key is not None:
                secret_key = settings.alpaca_secret_key.get_secret_value()
        if not api_key or not secret_key:
            raise ConfigError("fetch-bars --source alpaca needs TRADING_ALPACA_API_KEY and "
                              "TRADING_ALPACA_SECRET_KEY")
        url = base_url or getattr(settings, "alpaca_data_url", None)
        feed = getattr(settings, "alpaca_data_feed", None) or "iex"
        return AlpacaHistory(api_key, secret_key, url, feed=feed, timeout_s=timeout_s)
    raise ConfigError(f"unknown market-data source {source!r}; use one of {', '.join(SOURCES)}")


def fetch_bars(source: str | HistoricalSource, symbols: Sequence[str], start: dt.date,
               end: dt.date, out_dir: Path, *, settings: Any = None,
               api_key: str | None = None, secret_key: str | None = None,
               base_url: str | None = None, chunk_symbols: int = 16, gzip: bool = True,
               progress: Callable[[str], None] | None = None) -> FetchSummary:
    """Download ``symbols`` for the NYSE sessions ``start..end`` (inclusive) into ``out_dir``.

    ``source`` is ``"polygon"``, ``"alpaca"`` or a ready HistoricalSource. Symbols are fetched
    in groups of ``chunk_symbols`` over the whole date range (the clients page through it),
    so memory stays bounded. Raises MarketDataUnavailable naming the symbols that failed
    (files of groups fetched before stay written), ConfigError for bad arguments.
    """
    syms = [s.strip().upper() for s in symbols if s.strip()]
    if not syms:
        raise ConfigError("no symbols to fetch")
    if len(set(syms)) != len(syms):
        raise ConfigError(f"symbols listed twice: {syms}")
    if start > end:
        raise ConfigError(f"--from {start} is after --to {end}")
    sessions = sessions_between(start, end)
    if not sessions:
        raise ConfigError(f"no NYSE session between {start} and {end}")
    history = (make_history(source, settings, api_key=api_key, secret_key=secret_key,
                            base_url=base_url) if isinstance(source, str) else source)
    bounds = [session_bounds(d) for d in sessions]
    opens_ms = np.array([to_ms(o) for o, _ in bounds], dtype=np.int64)
    n_bars = [int((c - o).total_seconds()) // BAR_SECONDS for o, c in bounds]
    summary = FetchSummary(sessions=len(sessions))
    out_dir = Path(out_dir)
    bar_ms = BAR_SECONDS * 1000

    for i in range(0, len(syms), max(1, chunk_symbols)):
        chunk = syms[i:i + max(1, chunk_symbols)]
        if progress is not None:
            progress(f"{history.name}: {', '.join(chunk)} {start}..{end}")
        res = history.fetch_minutes(chunk, bounds[0][0], bounds[-1][1])
        if not res.ok:
            detail = "; ".join(f"{s}: {r}" for s, r in list(res.failed.items())[:5])
            raise MarketDataUnavailable(f"{history.name}: could not fetch {len(res.failed)} "
                                        f"symbols ({detail})")
        index = {s: j for j, s in enumerate(chunk)}
        grids = [np.full((n, len(chunk), 5), np.nan) for n in n_bars]
        for agg in res.aggs:
            j = index.get(agg.symbol)
            if j is None:
                continue
            d = int(np.searchsorted(opens_ms, agg.start_ms, side="right")) - 1
            if d < 0:
                continue
            bar, rem = divmod(agg.start_ms - int(opens_ms[d]), bar_ms)
            if rem or bar >= n_bars[d]:
                continue  # off the grid, or after the close (after-hours / pre-market)
            grids[d][bar, j] = agg.values()
        days = [DayBars(date=day, symbols=tuple(chunk), open_time=o, close_time=c,
                        bar_seconds=BAR_SECONDS, ohlcv=grid)
                for day, (o, c), grid in zip(sessions, bounds, grids, strict=True)
                if not np.isnan(grid[:, :, 3]).all()]
        for j, sym in enumerate(chunk):
            count = int(sum((~np.isnan(d.ohlcv[:, j, 3])).sum() for d in days))
            summary.bars[sym] = count
            if count == 0:
                summary.no_data.append(sym)
        summary.files.extend(write_bar_files(days, out_dir, gzip=gzip))
    if summary.no_data:
        log.warning("no bars for %s between %s and %s", ", ".join(summary.no_data), start, end)
    return summary


def _date(value: str) -> dt.date:
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {value!r}") from None


def add_fetch_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``fetch-bars`` subcommand to ``daytrader``'s subparsers."""
    fb = sub.add_parser("fetch-bars", help="download 1-minute bars from Polygon or Alpaca into "
                                           "bar files (SYMBOL_1min.csv.gz)")
    fb.add_argument("--source", choices=SOURCES, required=True, help="market-data vendor")
    fb.add_argument("--symbols", help="comma-separated symbols (default: TRADING_SYMBOLS)")
    fb.add_argument("--from", dest="from_", type=_date, required=True,
                    help="first session date")
    fb.add_argument("--to", type=_date, required=True, help="last session date (inclusive)")
    fb.add_argument("--out", type=Path, required=True, help="folder for the bar files")
    fb.add_argument("--plain", action="store_true", help="write .csv instead of .csv.gz")
    fb.add_argument("--base-url", help="the vendor's REST base URL (a proxy or a test server)")
    return fb


def run_fetch(args: argparse.Namespace) -> int:
    """``daytrader fetch-bars``: credentials and URL overrides come from the settings."""
    from core.config import load_settings

    settings = load_settings()
    symbols = ([s for s in args.symbols.replace(";", ",").split(",") if s.strip()]
               if getattr(args, "symbols", None) else list(settings.symbols))
    summary = fetch_bars(args.source, symbols, args.from_, args.to, args.out,
                         settings=settings, gzip=not getattr(args, "plain", False),
                         base_url=getattr(args, "base_url", None),
                         progress=lambda line: print(line, flush=True))
    total = sum(summary.bars.values())
    print(f"wrote {len(summary.files)} files, {total} bars over {summary.sessions} sessions "
          f"to {args.out}")
    if summary.no_data:
        print(f"no bars for: {', '.join(summary.no_data)}")
    return 0 if summary.files else 1
