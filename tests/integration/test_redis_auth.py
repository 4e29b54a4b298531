"""Redis with an ACL user and password, and TLS URLs: the runtime and Celery's configuration
accept them; a wrong password fails loudly."""

from __future__ import annotations

import datetime as dt
import importlib
import subprocess
import sys

import pytest
from redis import Redis
from redis.exceptions import AuthenticationError, ResponseError

from core.cluster import free_port, redis_answers, redis_server_binary
from core.config import Settings, get_settings
from core.runtime import build_runtime, connect_redis
from tests.helpers import wait_for


@pytest.fixture
def acl_server():
    port = free_port()
    proc = subprocess.Popen(
        [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--requirepass", "adminpass",
         "--user", "bot", "on", ">botpass", "~*", "&*", "+@all"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://bot:botpass@127.0.0.1:{port}/0"
    try:
        wait_for(lambda: redis_answers(url, 0.2), 10, "redis-server with ACL")
        yield port, url
    finally:
        proc.terminate()
        proc.wait(10)


def test_runtime_works_as_an_acl_user(acl_server) -> None:
    port, url = acl_server
    rt = build_runtime(Settings(redis_url=url, sim_run_id="acl"))
    day = dt.date(2025, 11, 24)
    assert rt.limits.reserve(day, "orb-AAA-20251124-0950-L", 12_345, 500_000)
    assert rt.limits.used(day) == 12_345
    with pytest.raises((AuthenticationError, ResponseError)):
        Redis.from_url(f"redis://bot:wrong@127.0.0.1:{port}/0").ping()


def test_tls_urls_verify_the_server(monkeypatch) -> None:
    client = connect_redis("rediss://bot:pw@redis.example:6380/0", ca_file="/etc/ssl/ca.pem")
    kwargs = client.connection_pool.connection_kwargs
    assert client.connection_pool.connection_class.__name__ == "SSLConnection"
    assert kwargs["ssl_cert_reqs"] == "required" and kwargs["ssl_ca_certs"] == "/etc/ssl/ca.pem"
    monkeypatch.setenv("TRADING_REDIS_URL", "rediss://bot:pw@redis.example:6380/0")
    monkeypatch.setenv("TRADING_REDIS_CA_FILE", "/etc/ssl/ca.pem")
    get_settings.cache_clear()
    try:
        sys.modules.pop("celeryconfig", None)
        conf = importlib.import_module("celeryconfig")
        assert conf.broker_url.startswith("rediss://")
        assert conf.broker_use_ssl["ssl_ca_certs"] == "/etc/ssl/ca.pem"
        assert conf.redis_backend_use_ssl == conf.broker_use_ssl
    finally:
        sys.modules.pop("celeryconfig", None)
        get_settings.cache_clear()
