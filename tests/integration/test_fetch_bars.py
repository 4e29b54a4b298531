"""``fetch_bars`` / ``daytrader fetch-bars`` with the REAL Polygon and Alpaca clients against
local servers: the bar files written read back through ``load_days`` identical to what the
vendor served (regular session only, across a DST change and a weekend, with pagination).
"""

from __future__ import annotations

import argparse
import datetime as dt

import numpy as np
import pytest

from core.calendar import session_bounds, sessions_between
from core.errors import ConfigError
from core.market.alpaca_data import AlpacaHistory
from core.market.feed import MarketDataUnavailable
from core.market.fetch import add_fetch_parser, fetch_bars, run_fetch
from core.market.files import load_days
from tests.fakes.polygon_server import AlpacaDataServer, PolygonRestServer, rest_bar

KEY = "test-key"
START, END = dt.date(2024, 3, 7), dt.date(2024, 3, 12)  # DST starts on Sunday 2024-03-10
SYMBOLS = ("AAPL", "MSFT", "TSLA")


def expected_days() -> dict[dt.date, np.ndarray]:
    """The bars each session should end up with: [n_bars, S, 5], NaN where absent."""
    out = {}
    for d_i, day in enumerate(sessions_between(START, END)):
        open_, close = session_bounds(day)
        n = int((close - open_).total_seconds()) // 60
        grid = np.full((n, len(SYMBOLS), 5), np.nan)
        for s_i in range(len(SYMBOLS)):
            for b in range(n):
                if (b + s_i + d_i) % 4 == 3:  # minutes without a trade
                    continue
                base = 50.0 + 25 * s_i + d_i + 0.0625 * (b % 97)
                grid[b, s_i] = (base, base + 0.25, base - 0.125, base + 0.0625,
                                float(100 + 13 * b + s_i))
        out[day] = grid
    return out


def vendor_rows(days: dict[dt.date, np.ndarray], s_i: int):
    """(start, o, h, l, c, v) rows served for symbol ``s_i``, plus extended-hours noise."""
    for day, grid in days.items():
        open_, close = session_bounds(day)
        for b in range(len(grid)):
            if not np.isnan(grid[b, s_i, 0]):
                yield (open_ + dt.timedelta(minutes=b), *grid[b, s_i])
        for extra in (-60, -1):  # pre-market
            yield (open_ + dt.timedelta(minutes=extra), 1.0, 1.0, 1.0, 1.0, 1.0)
        for extra in (0, 1, 120):  # after the close
            yield (close + dt.timedelta(minutes=extra), 1.0, 1.0, 1.0, 1.0, 1.0)


def assert_files_match(out_dir, days) -> None:
    loaded = load_days(out_dir, symbols=list(SYMBOLS))
    assert [d.date for d in loaded] == list(days)
    for d in loaded:
        assert d.symbols == SYMBOLS
        np.testing.assert_array_equal(d.ohlcv, days[d.date])
    text = (out_dir / "AAPL_1min.csv.gz").read_bytes()
    assert text[:2] == b"\x1f\x8b"


@pytest.fixture
def days():
    return expected_days()


def test_polygon_fetch_writes_files_that_load_back_identical(tmp_path, days) -> None:
    with PolygonRestServer(KEY, page_size=500) as server:
        for s_i, sym in enumerate(SYMBOLS):
            server.add_bars(sym, [rest_bar(*row) for row in vendor_rows(days, s_i)])
        summary = fetch_bars("polygon", [*SYMBOLS, "NODATA"], START, END, tmp_path,
                             api_key=KEY, base_url=server.url, chunk_symbols=2)
        assert any("cursor" in q for _, q in server.requests)  # next_url was followed
    assert summary.sessions == 4
    assert summary.no_data == ["NODATA"]
    assert sorted(p.name for p in summary.files) == [f"{s}_1min.csv.gz" for s in SYMBOLS]
    assert summary.bars["AAPL"] == int((~np.isnan(np.stack(
        [g[:, 0, 0] for g in days.values()]))).sum())
    assert_files_match(tmp_path, days)
    # DST: the first bar is 14:30 UTC before the change and 13:30 UTC after it
    first = (tmp_path / "AAPL_1min.csv.gz")
    import gzip

    lines = gzip.decompress(first.read_bytes()).decode().splitlines()
    assert lines[0] == "timestamp,symbol,open,high,low,close,volume"
    assert any(line.startswith("2024-03-08T09:30:00-05:00,AAPL") for line in lines)
    assert any(line.startswith("2024-03-11T09:30:00-04:00,AAPL") for line in lines)


def test_alpaca_fetch_writes_the_same_files(tmp_path, days) -> None:
    with AlpacaDataServer("ak", "as", page_size=700) as server:
        for s_i, sym in enumerate(SYMBOLS):
            server.add_bars(sym, vendor_rows(days, s_i))
        history = AlpacaHistory("ak", "as", server.url, timeout_s=5)
        summary = fetch_bars(history, SYMBOLS, START, END, tmp_path)
        assert any("page_token" in q and q["page_token"][0] for _, q in server.requests)
        assert all(q["feed"] == ["iex"] and q["timeframe"] == ["1Min"]
                   for _, q in server.requests)
    assert summary.no_data == []
    assert_files_match(tmp_path, days)


def test_alpaca_bad_credentials_fail_loudly(tmp_path) -> None:
    with AlpacaDataServer("ak", "as") as server:
        history = AlpacaHistory("ak", "wrong-secret", server.url, timeout_s=5)
        with pytest.raises(MarketDataUnavailable, match="AAPL") as info:
            fetch_bars(history, ["AAPL"], START, END, tmp_path)
    assert "wrong-secret" not in str(info.value)
    assert not list(tmp_path.iterdir())


def test_polygon_fetch_failure_names_the_symbols(tmp_path) -> None:
    with PolygonRestServer(KEY) as server:
        server.fail_next(503, times=50)
        with pytest.raises(MarketDataUnavailable, match="AAPL"):
            fetch_bars("polygon", ["AAPL"], START, END, tmp_path, api_key=KEY,
                       base_url=server.url)


def test_bad_arguments_are_config_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match="no NYSE session"):
        fetch_bars("polygon", ["AAPL"], dt.date(2024, 3, 9), dt.date(2024, 3, 10), tmp_path,
                   api_key=KEY)
    with pytest.raises(ConfigError, match="unknown market-data source"):
        fetch_bars("yahoo", ["AAPL"], START, END, tmp_path)
    with pytest.raises(ConfigError, match="after"):
        fetch_bars("polygon", ["AAPL"], END, START, tmp_path, api_key=KEY)


def test_run_fetch_from_the_command_line(tmp_path, days, monkeypatch, capsys) -> None:
    parser = argparse.ArgumentParser(prog="daytrader")
    add_fetch_parser(parser.add_subparsers(dest="command"))
    monkeypatch.setenv("TRADING_POLYGON_API_KEY", KEY)
    with PolygonRestServer(KEY) as server:
        for s_i, sym in enumerate(SYMBOLS):
            server.add_bars(sym, [rest_bar(*row) for row in vendor_rows(days, s_i)])
        args = parser.parse_args(["fetch-bars", "--source", "polygon", "--symbols",
                                  "aapl,MSFT,TSLA", "--from", "2024-03-07", "--to",
                                  "2024-03-12", "--out", str(tmp_path), "--base-url",
                                  server.url])
        assert run_fetch(args) == 0
    assert "wrote 3 files" in capsys.readouterr().out
    assert_files_match(tmp_path, days)
