"""``daytrader-flower`` refuses to run without a login, except unauthenticated on loopback
when told so explicitly, and never off loopback without a login."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


def check(**env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("TRADING_", "FLOWER_"))}
    return subprocess.run([sys.executable, "-m", "core.flower", "--check"], cwd=REPO,
                          env={**base, **env}, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("env", [
    {},
    {"TRADING_FLOWER_USER": "admin"},
    {"TRADING_FLOWER_PASSWORD": "pw-only"},
    {"TRADING_FLOWER_UNAUTHENTICATED_LOCALHOST": "true", "TRADING_FLOWER_ADDRESS": "0.0.0.0"},
])
def test_refused(env: dict[str, str]) -> None:
    proc = check(**env)
    assert proc.returncode == 2, proc.stderr
    assert "TRADING_FLOWER" in proc.stderr
    assert "pw-only" not in proc.stderr + proc.stdout


@pytest.mark.parametrize("env", [
    {"TRADING_FLOWER_USER": "admin", "TRADING_FLOWER_PASSWORD": "s3cret-pw"},
    {"TRADING_FLOWER_UNAUTHENTICATED_LOCALHOST": "true", "TRADING_FLOWER_ADDRESS": "127.0.0.1"},
])
def test_allowed(env: dict[str, str]) -> None:
    proc = check(**env)
    assert proc.returncode == 0, proc.stderr
    assert "s3cret-pw" not in proc.stderr + proc.stdout
