"""Alerts to a webhook: sent on fills, EOD, halts, breaker trips and model errors, rate-limited
across processes through Redis, off without a URL; a dead webhook never breaks trading."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from core.alerts import Alerter
from tasks import trading
from tests.helpers import eager_tasks, wait_for


@pytest.fixture
def hook():
    got: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            got.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *_: object) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/hook", got
    server.shutdown()


def test_off_without_url(redis_client) -> None:
    assert not Alerter(redis_client, "t:", None).send("fill", "x")


def test_rate_limited_and_once_keys(redis_client, hook) -> None:
    url, got = hook
    a = Alerter(redis_client, "t:", url, per_minute=5)
    sent = [a.send("fill", f"fill {i}") for i in range(12)]
    assert sent.count(True) == 5
    wait_for(lambda: len(got) == 5, 10, "five posts")
    b = Alerter(redis_client, "u:", url, per_minute=50)
    assert b.send("eod", "flat", once_key="eod:2025-11-24")
    assert not b.send("eod", "flat again", once_key="eod:2025-11-24")
    wait_for(lambda: len(got) == 6, 10, "the eod post")
    assert got[-1]["text"].startswith("[daytrader eod]") and got[-1]["content"]


def test_dead_webhook_is_harmless(redis_client) -> None:
    a = Alerter(redis_client, "t:", "http://127.0.0.1:9/nothing", timeout_s=0.5)
    assert a.send("error", "boom")  # queued; the failed post is only logged


def test_cluster_alerts_on_fills_and_the_kill_switch(redis_client, redis_url, monkeypatch,
                                                      hook) -> None:
    url, got = hook
    with eager_tasks(monkeypatch, redis_url, "alerts", TRADING_ALERT_WEBHOOK_URL=url,
                     TRADING_ALERT_MAX_PER_MINUTE="200") as rt:
        for _ in range(120):
            trading.tick.delay().get()
            if rt.broker.get_positions():
                break
        assert rt.broker.get_positions()
        trading.flatten_all.delay("test").get()
        wait_for(lambda: any("[daytrader halt]" in g["text"] for g in got), 10, "halt alert")
        fills = [g["text"] for g in got if g["text"].startswith("[daytrader fill]")]
        assert fills and "entry" in fills[0]
        assert all("secret" not in g["text"].lower() for g in got)
