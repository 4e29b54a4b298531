"""Shared fixtures: a real Redis (the configured one, or a private server started here).

Tests use database 15 of the server at ``TRADING_TEST_REDIS_URL`` (default
redis://127.0.0.1:6379/15) when it answers; otherwise a private redis-server is started on a
free loopback port for the session. Each test gets a flushed database.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.cluster import PrivateRedis, redis_answers

REPO = Path(__file__).resolve().parents[1]
SHARED_BARS = REPO.parent / "shared" / "data" / "bars"


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of a real Redis database reserved for tests."""
    url = os.environ.get("TRADING_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
    if redis_answers(url):
        yield url
        return
    if os.environ.get("CI") and os.environ.get("TRADING_TEST_REQUIRE_REDIS"):
        pytest.fail(f"no Redis at {url}")
    server = PrivateRedis.start(db=15)
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[object]:
    """A client on the test database, flushed before and after the test."""
    from core.runtime import connect_redis

    client = connect_redis(redis_url)
    client.flushdb()
    yield client
    client.flushdb()


@pytest.fixture
def shared_bars() -> Path:
    """The real bar files in ../shared/data/bars (skips when the folder is absent)."""
    if not SHARED_BARS.is_dir():
        pytest.skip(f"real bar data not present at {SHARED_BARS}")
    return SHARED_BARS
