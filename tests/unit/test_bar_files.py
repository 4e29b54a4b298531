"""Tests for core.market.files: loading, cleaning and writing bar files."""

from __future__ import annotations

import datetime as dt
import gzip
import logging
from pathlib import Path

import numpy as np
import pytest

from core.calendar import NY, session_bounds
from core.errors import BarDataError
from core.market.files import list_bar_files, load_days, write_bar_files
from core.models import CLOSE, OPEN, VOLUME, DayBars

HEADER = "timestamp,symbol,open,high,low,close,volume"
DAY = dt.date(2019, 2, 11)  # a Monday in EST (-05:00), full session: 390 one-minute bars
LOGGER = "core.market.files"
SHARED_BARS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "bars"


def row(
    ts: str,
    symbol: str = "AAA",
    o: object = 10.0,
    h: object = 11.0,
    lo: object = 9.0,
    c: object = 10.5,
    v: object = 100,
) -> str:
    """One CSV line; ``ts`` may be a bare ``HH:MM[:SS]`` time on DAY in EST."""
    if len(ts) <= 8:
        ts = f"{DAY.isoformat()}T{ts if ts.count(':') == 2 else ts + ':00'}-05:00"
    return f"{ts},{symbol},{o},{h},{lo},{c},{v}"


def write_csv(
    folder: Path, name: str, rows: list[str], header: str = HEADER, compress: bool = False
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    text = header + "\n" + "".join(r + "\n" for r in rows)
    path = folder / name
    if compress:
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def present_slots(day: DayBars, s_idx: int = 0) -> list[int]:
    """Bar indexes where symbol ``s_idx`` has a bar."""
    return np.flatnonzero(~np.isnan(day.ohlcv[:, s_idx, CLOSE])).tolist()


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


@pytest.fixture(autouse=True)
def _capture_warnings(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)


# --- clean files -------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_clean_file_loads_exact_values_and_keeps_gaps_nan(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, compress: bool
) -> None:
    name = "AAA_1min.csv.gz" if compress else "AAA_1min.csv"
    write_csv(
        tmp_path,
        name,
        [
            row("09:30", o=10.0, h=10.5, lo=9.9, c=10.2, v=1000),
            row("09:31", o=10.2, h=10.3, lo=10.1, c=10.25, v=0),  # zero volume is kept
            row("09:33", o=10.25, h=10.4, lo=10.2, c=10.3, v=700),
            row("15:59", o=11.0, h=11.1, lo=10.9, c=11.05, v=5000),
        ],
        compress=compress,
    )
    (day,) = load_days(tmp_path)
    assert day.date == DAY
    assert day.symbols == ("AAA",)
    assert day.bar_seconds == 60
    assert day.open_time == dt.datetime(2019, 2, 11, 9, 30, tzinfo=NY)
    assert day.close_time == dt.datetime(2019, 2, 11, 16, 0, tzinfo=NY)
    assert day.ohlcv.shape == (390, 1, 5)
    assert present_slots(day) == [0, 1, 3, 389]
    np.testing.assert_array_equal(day.ohlcv[0, 0], [10.0, 10.5, 9.9, 10.2, 1000])
    np.testing.assert_array_equal(day.ohlcv[1, 0], [10.2, 10.3, 10.1, 10.25, 0])
    np.testing.assert_array_equal(day.ohlcv[389, 0], [11.0, 11.1, 10.9, 11.05, 5000])
    assert np.isnan(day.ohlcv[2, 0]).all()  # the gap stays NaN in all five fields
    assert warnings_of(caplog) == []


def test_list_bar_files_maps_symbols_and_ignores_other_files(tmp_path: Path) -> None:
    write_csv(tmp_path, "BBB_1min.csv", [row("09:30", symbol="BBB")])
    write_csv(tmp_path, "AAA_1min.csv.gz", [row("09:30")], compress=True)
    (tmp_path / "README.md").write_text("not a bar file")
    (tmp_path / "notes.csv").write_text("x")
    files = list_bar_files(tmp_path)
    assert files == {"AAA": tmp_path / "AAA_1min.csv.gz", "BBB": tmp_path / "BBB_1min.csv"}
    assert list(files) == ["AAA", "BBB"]


def test_symbols_order_days_and_date_filter(tmp_path: Path) -> None:
    d1, d2, d3 = "2019-02-11", "2019-02-12", "2019-02-13"
    write_csv(
        tmp_path,
        "AAA_1min.csv",
        [row(f"{d1}T09:30:00-05:00", c=10.1), row(f"{d3}T09:30:00-05:00", c=10.3)],
    )
    write_csv(
        tmp_path,
        "BBB_1min.csv",
        [
            row(f"{d2}T09:31:00-05:00", "BBB", o=20, h=21, lo=19, c=20.2),
            row(f"{d3}T09:32:00-05:00", "BBB", o=20, h=21, lo=19, c=20.3),
        ],
    )
    days = load_days(tmp_path, symbols=["BBB", "AAA"])
    assert [d.date for d in days] == [
        dt.date(2019, 2, 11),
        dt.date(2019, 2, 12),
        dt.date(2019, 2, 13),
    ]
    assert all(d.symbols == ("BBB", "AAA") for d in days)
    assert present_slots(days[0], 0) == [] and present_slots(days[0], 1) == [0]
    assert present_slots(days[1], 0) == [1] and present_slots(days[1], 1) == []
    assert days[2].ohlcv[2, 0, CLOSE] == 20.3 and days[2].ohlcv[0, 1, CLOSE] == 10.3

    assert load_days(tmp_path)[0].symbols == ("AAA", "BBB")  # sorted when not given
    only = load_days(tmp_path, start=dt.date(2019, 2, 12), end=dt.date(2019, 2, 12))
    assert [d.date for d in only] == [dt.date(2019, 2, 12)]
    feb12 = dt.date(2019, 2, 12)
    assert load_days(tmp_path, symbols=["AAA"], start=feb12, end=feb12) == []


def test_early_close_day_has_210_bars(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    d = "2015-12-24"  # NYSE closes at 13:00
    write_csv(
        tmp_path,
        "GOOG_1min.csv",
        [
            row(f"{d}T09:30:00-05:00", "GOOG", c=10.1),
            row(f"{d}T12:59:00-05:00", "GOOG", c=10.2),
            row(f"{d}T13:00:00-05:00", "GOOG", c=10.3),  # at the early close: dropped
        ],
    )
    (day,) = load_days(tmp_path)
    assert day.n_bars == 210 and day.ohlcv.shape == (210, 1, 5)
    assert day.close_time == dt.datetime(2015, 12, 24, 13, 0, tzinfo=NY)
    assert present_slots(day) == [0, 209]
    assert day.ohlcv[209, 0, CLOSE] == 10.2
    (record,) = warnings_of(caplog)
    assert "outside_session=1" in record.getMessage()


def test_daylight_saving_and_other_offsets(tmp_path: Path) -> None:
    write_csv(
        tmp_path,
        "AAA_1min.csv",
        [
            row("2019-03-11T09:30:00-04:00", c=10.1),  # first Monday after the DST change
            row("2019-03-11T13:31:00+00:00", c=10.2),  # same instant rules: 09:31 EDT
            row("2019-02-11T14:32:00Z", c=10.3),  # 09:32 EST
        ],
    )
    feb, mar = load_days(tmp_path)
    assert present_slots(feb) == [2]
    assert present_slots(mar) == [0, 1]
    assert mar.open_time.utcoffset() == dt.timedelta(hours=-4)


def test_five_minute_files(tmp_path: Path) -> None:
    write_csv(tmp_path, "AAA_5min.csv", [row("09:30"), row("09:35"), row("15:55")])
    (day,) = load_days(tmp_path)
    assert day.bar_seconds == 300 and day.n_bars == 78
    assert present_slots(day) == [0, 1, 77]


# --- row-level problems: dropped, one warning per file ----------------------------------

BAD_ROWS = {
    "nan_price": (row("09:32", o="nan"), "bad_price"),
    "empty_price": (row("09:32", c=""), "bad_price"),
    "text_price": (row("09:32", h="abc"), "bad_price"),
    "zero_price": (row("09:32", o=0, lo=0), "bad_price"),
    "negative_price": (row("09:32", lo=-1), "bad_price"),
    "inf_price": (row("09:32", h="inf"), "bad_price"),
    "high_below_low": (row("09:32", h=9.0, lo=9.5, o=9.2, c=9.3), "bad_ohlc"),
    "open_above_high": (row("09:32", o=11.5), "bad_ohlc"),
    "open_below_low": (row("09:32", o=8.5), "bad_ohlc"),
    "close_above_high": (row("09:32", c=11.5), "bad_ohlc"),
    "close_below_low": (row("09:32", c=8.0), "bad_ohlc"),
    "negative_volume": (row("09:32", v=-5), "bad_volume"),
    "empty_volume": (row("09:32", v=""), "bad_volume"),
    "bad_timestamp": (row("2019-02-11T25:99:00-05:00"), "bad_timestamp"),
    "garbage_timestamp": (row("yesterday-at-noon"), "bad_timestamp"),
    "no_offset": (row("2019-02-11T09:32:00"), "no_offset"),
    "before_open": (row("09:29"), "outside_session"),
    "at_close": (row("16:00"), "outside_session"),
    "after_close": (row("17:45"), "outside_session"),
    "saturday": (row("2019-02-16T10:00:00-05:00"), "non_session_date"),
    "holiday": (row("2019-02-18T10:00:00-05:00"), "non_session_date"),  # Presidents' Day
    "before_calendar": (row("1999-02-11T10:00:00-05:00"), "non_session_date"),
    "year_9999": (row("9999-02-11T10:00:00-05:00"), "non_session_date"),
    "misaligned_seconds": (row("09:32:30"), "misaligned"),
    "wrong_symbol": (row("09:32", symbol="BBB"), "symbol_mismatch"),
    "too_many_fields": (row("09:32") + ",7", "malformed_line"),
    "too_few_fields": ("2019-02-11T09:32:00-05:00,AAA,10,11,9", "bad_price"),
}


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_row_is_dropped_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, case: str, compress: bool
) -> None:
    bad, reason = BAD_ROWS[case]
    name = "AAA_1min.csv.gz" if compress else "AAA_1min.csv"
    path = write_csv(
        tmp_path, name, [row("09:30", c=10.1), bad, row("09:31", c=10.2)], compress=compress
    )
    days = load_days(tmp_path)
    assert len(days) == 1  # a dropped row on another date makes no extra day
    (day,) = days
    assert present_slots(day) == [0, 1]
    np.testing.assert_array_equal(day.ohlcv[[0, 1], 0, CLOSE], [10.1, 10.2])
    (record,) = warnings_of(caplog)
    message = record.getMessage()
    assert f"{reason}=1" in message
    assert "kept 2 of 3 rows" in message
    assert record.symbol == "AAA"
    assert record.file == str(path)


def test_many_problems_in_one_file_give_one_summary_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_csv(
        tmp_path,
        "AAA_1min.csv",
        [
            row("09:33", c=10.3),
            row("09:30", c=10.0),  # out of order
            row("09:31", o="x"),
            row("09:31", c=10.1),
            row("09:31", c=99.0, h=100),  # duplicate of the row above: dropped
            row("09:40", v=-1),
            row("2019-02-11T09:45:00"),
        ],
    )
    (day,) = load_days(tmp_path)
    assert present_slots(day) == [0, 1, 3]
    np.testing.assert_array_equal(day.ohlcv[[0, 1, 3], 0, CLOSE], [10.0, 10.1, 10.3])
    (record,) = warnings_of(caplog)
    message = record.getMessage()
    assert "kept 3 of 7 rows" in message
    for part in ("bad_price=1", "bad_volume=1", "no_offset=1", "duplicate=1", "sorted"):
        assert part in message
    assert record.dropped == {"no_offset": 1, "bad_price": 1, "bad_volume": 1, "duplicate": 1}


def test_unsorted_rows_are_sorted_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_csv(
        tmp_path, "AAA_1min.csv", [row("09:32", c=10.2), row("09:30", c=10.0), row("09:31", c=10.1)]
    )
    (day,) = load_days(tmp_path)
    np.testing.assert_array_equal(day.ohlcv[:3, 0, CLOSE], [10.0, 10.1, 10.2])
    (record,) = warnings_of(caplog)
    assert "sorted" in record.getMessage() and record.sorted is True


def test_duplicate_timestamp_keeps_the_first(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_csv(
        tmp_path,
        "AAA_1min.csv",
        [row("09:30", c=10.0, v=1), row("09:30", c=10.4, v=2), row("09:30", c=10.3, v=3)],
    )
    (day,) = load_days(tmp_path)
    assert present_slots(day) == [0]
    assert day.ohlcv[0, 0, CLOSE] == 10.0 and day.ohlcv[0, 0, VOLUME] == 1
    (record,) = warnings_of(caplog)
    assert "duplicate=2" in record.getMessage()


# --- file-level problems: BarDataError ---------------------------------------------------


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(BarDataError, match="does not exist"):
        load_days(tmp_path / "nowhere")


def test_folder_without_bar_files(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("hello")
    with pytest.raises(BarDataError, match="no bar files"):
        list_bar_files(tmp_path)


def test_unknown_symbol_is_named_with_what_exists(tmp_path: Path) -> None:
    write_csv(tmp_path, "AAA_1min.csv", [row("09:30")])
    write_csv(tmp_path, "BBB_1min.csv", [row("09:30", "BBB")])
    with pytest.raises(BarDataError, match=r"ZZZ.*available: AAA, BBB"):
        load_days(tmp_path, symbols=["AAA", "ZZZ"])


def test_wrong_header(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "AAA_1min.csv", [row("09:30")], header="time,sym,o,h,l,c,v")
    with pytest.raises(BarDataError, match="header") as err:
        load_days(tmp_path)
    assert str(path) in str(err.value)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "AAA_1min.csv"
    path.write_text("")
    with pytest.raises(BarDataError, match="header") as err:
        load_days(tmp_path)
    assert str(path) in str(err.value)


def test_unreadable_gzip(tmp_path: Path) -> None:
    path = tmp_path / "AAA_1min.csv.gz"
    path.write_bytes(b"\x1f\x8b" + b"this is not gzip data at all")
    with pytest.raises(BarDataError, match="cannot read") as err:
        load_days(tmp_path)
    assert str(path) in str(err.value)


def test_file_without_usable_rows(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path, "AAA_1min.csv", [row("09:30", o=-1), row("2019-02-16T10:00:00-05:00")]
    )
    with pytest.raises(BarDataError, match="no usable rows") as err:
        load_days(tmp_path)
    assert str(path) in str(err.value)


def test_header_only_file(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "AAA_1min.csv", [])
    with pytest.raises(BarDataError, match="no usable rows") as err:
        load_days(tmp_path)
    assert str(path) in str(err.value)


def test_two_bar_sizes_for_one_symbol(tmp_path: Path) -> None:
    write_csv(tmp_path, "AAA_1min.csv", [row("09:30")])
    write_csv(tmp_path, "AAA_5min.csv", [row("09:30")])
    with pytest.raises(BarDataError, match=r"AAA_1min\.csv and AAA_5min\.csv"):
        list_bar_files(tmp_path)


def test_plain_and_gzip_for_one_symbol(tmp_path: Path) -> None:
    write_csv(tmp_path, "AAA_1min.csv", [row("09:30")])
    write_csv(tmp_path, "AAA_1min.csv.gz", [row("09:30")], compress=True)
    with pytest.raises(BarDataError, match=r"AAA_1min\.csv and AAA_1min\.csv\.gz"):
        load_days(tmp_path)


def test_selected_symbols_with_different_bar_sizes(tmp_path: Path) -> None:
    write_csv(tmp_path, "AAA_1min.csv", [row("09:30")])
    write_csv(tmp_path, "BBB_5min.csv", [row("09:30", "BBB")])
    with pytest.raises(BarDataError, match=r"AAA_1min\.csv \(1 min\).*BBB_5min\.csv \(5 min\)"):
        load_days(tmp_path)
    assert len(load_days(tmp_path, symbols=["BBB"])) == 1


def test_five_minute_data_in_a_one_minute_file(tmp_path: Path) -> None:
    rows = [row(f"{10 + i // 12:02d}:{(i % 12) * 5:02d}") for i in range(24)]
    write_csv(tmp_path, "AAA_1min.csv", rows)
    with pytest.raises(BarDataError, match="named 1min but its bars are 5 minutes apart"):
        load_days(tmp_path)


def test_one_minute_data_in_a_five_minute_file(tmp_path: Path) -> None:
    rows = [row(f"10:{m:02d}") for m in range(20)]
    write_csv(tmp_path, "AAA_5min.csv", rows)
    with pytest.raises(BarDataError, match="off the 5-minute grid"):
        load_days(tmp_path)


# --- writing ------------------------------------------------------------------------------


def _hand_days() -> list[DayBars]:
    rng = np.random.default_rng(3)
    out = []
    for date in (dt.date(2019, 2, 11), dt.date(2015, 12, 24), dt.date(2019, 3, 11)):
        open_, close = session_bounds(date)
        n = int((close - open_).total_seconds()) // 60
        close_px = 50 + np.cumsum(rng.normal(0, 0.05, (n, 2)), axis=0)
        open_px = close_px + rng.normal(0, 0.01, (n, 2))
        high = np.maximum(open_px, close_px) + 0.0123456
        low = np.minimum(open_px, close_px) - 0.0098765
        vol = rng.integers(0, 10_000, (n, 2)).astype(float)
        ohlcv = np.stack([open_px, high, low, close_px, vol], axis=2)
        ohlcv[rng.random((n, 2)) < 0.05] = np.nan
        if date == dt.date(2015, 12, 24):
            ohlcv[:, 1] = np.nan  # BBB has no bar that day
        out.append(DayBars(date, ("AAA", "BBB"), open_, close, 60, ohlcv))
    return out


@pytest.mark.parametrize("compress", [True, False], ids=["gzip", "plain"])
def test_round_trip(tmp_path: Path, caplog: pytest.LogCaptureFixture, compress: bool) -> None:
    days = _hand_days()
    paths = write_bar_files(days, tmp_path / "out", gzip=compress)
    suffix = ".csv.gz" if compress else ".csv"
    assert sorted(p.name for p in paths) == [f"AAA_1min{suffix}", f"BBB_1min{suffix}"]
    loaded = load_days(tmp_path / "out", symbols=["AAA", "BBB"])
    assert warnings_of(caplog) == []
    assert [d.date for d in loaded] == sorted(d.date for d in days)
    for got in loaded:
        (want,) = [d for d in days if d.date == got.date]
        assert got.symbols == want.symbols
        assert got.open_time == want.open_time and got.close_time == want.close_time
        expected = want.ohlcv.copy()
        expected[..., :4] = np.round(expected[..., :4], 4)
        np.testing.assert_array_equal(np.isnan(got.ohlcv), np.isnan(expected))
        np.testing.assert_allclose(got.ohlcv, expected, rtol=0, atol=1e-9)


def test_written_text_format(tmp_path: Path) -> None:
    open_ = dt.datetime(2019, 2, 11, 9, 30, tzinfo=NY)
    ohlcv = np.full((390, 1, 5), np.nan)
    ohlcv[0, 0] = [170.123449, 170.5, 169.99999, 170.25, 1234.4]
    ohlcv[2, 0] = [170.25, 170.3, 170.2, 170.3, 7]
    day = DayBars(DAY, ("AAPL",), open_, open_.replace(hour=16, minute=0), 60, ohlcv)
    (path,) = write_bar_files([day], tmp_path, gzip=False)
    assert path.name == "AAPL_1min.csv"
    assert path.read_text().splitlines() == [
        HEADER,
        "2019-02-11T09:30:00-05:00,AAPL,170.1234,170.5,170,170.25,1234",
        "2019-02-11T09:32:00-05:00,AAPL,170.25,170.3,170.2,170.3,7",
    ]


def test_write_refuses_a_second_file_for_a_symbol(tmp_path: Path) -> None:
    days = _hand_days()
    write_bar_files(days, tmp_path, gzip=True)
    write_bar_files(days, tmp_path, gzip=True)  # same names: replaced
    with pytest.raises(BarDataError, match="already holds AAA"):
        write_bar_files(days, tmp_path, gzip=False)


# --- the shared development data -----------------------------------------------------------

# From PROVENANCE.md: symbol -> (trading days, rows, missing one-minute bars).
SHARED_COUNTS = {
    "SPY": (55, 21450, 0),
    "AAPL": (8, 3118, 2),
    "BAC": (11, 4290, 0),
    "IBM": (6, 2338, 2),
    "AIG": (6, 2339, 1),
    "GOOG": (3, 982, 8),
    "QQQ": (5, 1948, 2),
    "MSFT": (5, 1948, 2),
    "AMZN": (5, 1944, 6),
    "TSLA": (5, 1946, 4),
    "JPM": (5, 1950, 0),
    "V": (5, 1950, 0),
    "MU": (5, 1948, 2),
    "SBUX": (5, 1948, 2),
    "GLD": (5, 1927, 23),
    "VOO": (5, 1934, 16),
}


def test_shared_development_bars(caplog: pytest.LogCaptureFixture) -> None:
    if not SHARED_BARS.is_dir():
        pytest.skip(f"shared bar data not present at {SHARED_BARS}")
    days = load_days(SHARED_BARS)
    assert warnings_of(caplog) == []  # the development set is clean
    assert days[0].symbols == tuple(sorted(SHARED_COUNTS))
    assert [d.date for d in days] == sorted({d.date for d in days})
    for j, symbol in enumerate(days[0].symbols):
        n_days, n_rows, n_missing = SHARED_COUNTS[symbol]
        mine = [d for d in days if not np.isnan(d.ohlcv[:, j, CLOSE]).all()]
        present = sum(int((~np.isnan(d.ohlcv[:, j, CLOSE])).sum()) for d in mine)
        missing = sum(int(np.isnan(d.ohlcv[:, j, CLOSE]).sum()) for d in mine)
        assert (len(mine), present, missing) == (n_days, n_rows, n_missing), symbol
        for d in mine:
            x = d.ohlcv[:, j, :]
            ok = ~np.isnan(x[:, CLOSE])
            assert np.isnan(x[~ok]).all(), symbol  # a missing bar is NaN in every field
            assert (x[ok, VOLUME] >= 0).all() and (x[ok, :4] > 0).all()

    g = days[0].symbols.index("GOOG")
    goog = {d.date: d for d in days if not np.isnan(d.ohlcv[:, g, CLOSE]).all()}
    assert sorted(goog) == [dt.date(2015, 12, 23), dt.date(2015, 12, 24), dt.date(2015, 12, 28)]
    half = goog[dt.date(2015, 12, 24)]
    assert half.n_bars == 210 and not np.isnan(half.ohlcv[:, g, CLOSE]).any()
    assert int(np.isnan(goog[dt.date(2015, 12, 28)].ohlcv[:, g, CLOSE]).sum()) == 8

    a = days[0].symbols.index("AAPL")
    aapl = {d.date: d.ohlcv[:, a, :] for d in days if not np.isnan(d.ohlcv[:, a, CLOSE]).all()}
    assert 600 < np.nanmax(aapl[dt.date(2014, 6, 6)][:, OPEN]) < 700  # before the 7:1 split
    assert 80 < np.nanmax(aapl[dt.date(2014, 6, 9)][:, OPEN]) < 100  # after it (unadjusted)


# --- many files: parsed by forked readers ---------------------------------------------------


def _many(tmp_path: Path, n: int = 10) -> Path:
    import datetime as dt

    from core.calendar import next_sessions
    from core.market.files import write_bar_files
    from core.market.synthetic import generate_days

    folder = tmp_path / "many"
    write_bar_files(generate_days(next_sessions(dt.date(2025, 11, 24), 3),
                                  [f"M{i:02d}" for i in range(n)], seed=9), folder)
    return folder


def test_many_files_load_the_same_in_forked_readers_and_here(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    import numpy as np

    from core.market import bar_parse, files

    folder = _many(tmp_path)
    calls: list[int] = []
    parallel = files.load_days(folder, meanwhile=lambda: calls.append(1))
    monkeypatch.setattr(bar_parse, "_PARALLEL_MIN_FILES", 10_000)  # one process
    serial = files.load_days(folder, meanwhile=lambda: calls.append(2))
    assert calls == [1, 2]  # once each time
    assert [d.date for d in parallel] == [d.date for d in serial]
    for a, b in zip(parallel, serial, strict=True):
        assert a.symbols == b.symbols and a.close_time == b.close_time
        np.testing.assert_array_equal(a.ohlcv, b.ohlcv)


def test_a_bad_file_among_many_is_named_as_when_read_here(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    import gzip

    from core.errors import BarDataError
    from core.market import bar_parse, files

    folder = _many(tmp_path)
    for name in ("M07_1min.csv.gz", "M03_1min.csv.gz"):
        (folder / name).write_bytes(gzip.compress(b"time,sym,o,h,l,c,v\n1,2,3,4,5,6,7\n"))
    with pytest.raises(BarDataError) as parallel:
        files.load_days(folder)
    monkeypatch.setattr(bar_parse, "_PARALLEL_MIN_FILES", 10_000)
    with pytest.raises(BarDataError) as serial:
        files.load_days(folder)
    assert "M03_1min.csv.gz" in str(parallel.value)  # the first bad one in symbol order
    assert str(parallel.value) == str(serial.value)


def _load_in_daemon(folder: str, out) -> None:
    from core.market import files

    try:
        days = files.load_days(Path(folder))
        out.send(("ok", [(d.date.isoformat(), d.ohlcv.tobytes()) for d in days]))
    except BaseException as exc:  # reported to the test, which fails on it
        out.send(("error", repr(exc)))


def test_a_daemonic_process_reads_many_files_itself(tmp_path: Path) -> None:
    """A Celery pool worker is daemonic and may not start children: the first tick of a
    replay from files, prepared there, reads the files in that process."""
    import multiprocessing

    from core.market import files

    folder = _many(tmp_path)
    ctx = multiprocessing.get_context("fork")
    here, there = ctx.Pipe()
    proc = ctx.Process(target=_load_in_daemon, args=(str(folder), there), daemon=True)
    proc.start()
    status, got = here.recv()
    proc.join(30)
    assert status == "ok", got
    want = [(d.date.isoformat(), d.ohlcv.tobytes()) for d in files.load_days(folder)]
    assert got == want and len(got) == 3
