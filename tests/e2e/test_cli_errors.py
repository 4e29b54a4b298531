"""`daytrader sim` refuses bad input with a clear message and exit status 2, before starting
anything."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

BIN = Path(sys.executable).parent


def run(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("TRADING_")}
    return subprocess.run([str(BIN / "daytrader"), "sim", *args], env={**base, **env},
                          capture_output=True, text=True, timeout=120, cwd=REPO)


def test_missing_data_folder(tmp_path) -> None:
    out = run(["--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert out.returncode == 2
    assert "daytrader: error:" in out.stderr and "nope" in out.stderr
    assert not (tmp_path / "o").exists()


def test_malformed_bar_file(tmp_path) -> None:
    data = tmp_path / "bars"
    data.mkdir()
    with gzip.open(data / "AAPL_1min.csv.gz", "wt") as fh:
        fh.write("time,sym,price\n1,2,3\n")
    out = run(["--data", str(data), "--out", str(tmp_path / "o")])
    assert out.returncode == 2 and "AAPL_1min.csv.gz" in out.stderr


def test_unknown_symbol(tmp_path, shared_bars) -> None:
    out = run(["--data", str(shared_bars), "--symbols", "NOTREAL", "--out", str(tmp_path)])
    assert out.returncode == 2 and "NOTREAL" in out.stderr


@pytest.mark.parametrize(("var", "value"), [("TRADING_STOP_LOSS_PCT", "abc"),
                                            ("TRADING_SIM_SPEED", "-1"),
                                            ("TRADING_DAILY_POSITION_LIMIT", "-5")])
def test_bad_setting_names_the_variable(tmp_path, redis_url, var, value) -> None:
    out = run(["--synthetic", "--out", str(tmp_path)], TRADING_REDIS_URL=redis_url,
              **{var: value})
    assert out.returncode == 2 and var in out.stderr
