"""Security properties of the running cluster, with real processes.

(a) A pickled task message put straight on the ``exec`` queue is refused by a real exec worker
    (``accept_content = ["json"]``): the worker logs ContentDisallowed, never unpickles the
    body (whose unpickling would create a marker file) and never runs the task, and it goes on
    running JSON tasks.
(b) Secrets set in the environment (Alpaca and Polygon keys, Flower's password) appear in no
    log of a simulated run, in no Flower page or API answer (tasks with their arguments,
    workers with their configuration) and in no task message or other value in Redis.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis

from tests.conftest import REPO
from tests.e2e.test_flower_browser import CHAIN, CHROMIUM, chromium_dom, flower_sim, start_redis
from tests.helpers import stop_process, wait_for

pytestmark = pytest.mark.e2e

# --- (a) a pickled message is refused -------------------------------------------------------


@pytest.fixture
def exec_worker(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A real exec worker (``-Q exec``) on a private Redis; yields (redis url, its log)."""
    server, url = start_redis(tmp_path)
    log = tmp_path / "worker-exec.log"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TRADING_", "CELERY_"))}
    env.update(TRADING_REDIS_URL=url, PYTHONUNBUFFERED="1")
    with log.open("wb") as sink:
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tasks", "worker", "-Q", "exec", "-c", "1",
             "-n", f"exec-sec-{uuid.uuid4().hex[:6]}@%h", "--without-gossip", "--without-mingle",
             "-l", "INFO"],
            env=env, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT)
    try:
        def ready() -> bool:
            assert worker.poll() is None, log.read_text()[-3000:]
            return " ready." in log.read_text()

        wait_for(ready, 60, "the exec worker")
        yield url, log
    finally:
        stop_process(worker, signal.SIGTERM, 20)
        server.terminate()
        server.wait(10)


class _Tripwire:
    """Unpickling this opens (creates) ``path``: proof that someone deserialized the body."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.path), "w"))


def _publish(url: str, kwargs: dict, serializer: str) -> str:
    """Publish a Celery protocol-2 message for ``tasks.ping`` straight on the ``exec`` queue
    (headers built by Celery itself), serialized with ``serializer``; returns its id."""
    from celery import Celery
    from kombu import Connection, Producer

    task_id = str(uuid.uuid4())
    message = Celery("probe", set_as_current=False).amqp.as_task_v2(
        task_id, "tasks.ping", args=(), kwargs=kwargs)
    assert message.headers["task"] == "tasks.ping" and message.headers["id"] == task_id
    with Connection(url) as conn:
        Producer(conn.default_channel).publish(
            message.body, exchange="", routing_key="exec", serializer=serializer,
            headers=message.headers, **message.properties)
    return task_id


def test_pickled_message_on_exec_queue_is_refused(exec_worker, tmp_path: Path) -> None:
    url, log = exec_worker
    marker = tmp_path / "unpickled"
    bad = _publish(url, {"payload": {"x": _Tripwire(marker)}}, "pickle")
    # a JSON ping sent afterwards runs: the worker read the pickled message before it
    good = _publish(url, {"payload": {"probe": "json"}}, "json")
    wait_for(lambda: f"tasks.ping[{good}] succeeded" in log.read_text(), 30,
             "the JSON ping to run")
    text = log.read_text()
    assert "ContentDisallowed" in text or "Refusing to deserialize untrusted content" in text
    assert "untrusted content of type pickle" in text
    assert f"tasks.ping[{bad}]" not in text  # never received as a task, never run
    assert not marker.exists(), "the worker unpickled the message body"
    # the refused message was acknowledged and dropped, not left to come back
    client = Redis.from_url(url)
    wait_for(lambda: client.llen("exec") == 0 and not client.hlen("unacked"), 10,
             "the exec queue to be empty")


# --- (b) secrets never leak ------------------------------------------------------------------


def _redis_values(url: str) -> list[bytes]:
    """Every key and value of the database, with kombu message bodies decoded."""
    client = Redis.from_url(url)
    out: list[bytes] = []
    for key in client.scan_iter(count=1000):
        kind = client.type(key)
        if kind == b"string":
            values = [client.get(key)]
        elif kind == b"list":
            values = client.lrange(key, 0, -1)
        elif kind == b"hash":
            values = [x for pair in client.hgetall(key).items() for x in pair]
        elif kind == b"set":
            values = list(client.smembers(key))
        elif kind == b"zset":
            values = [m for m, _ in client.zrange(key, 0, -1, withscores=True)]
        else:
            values = [repr(client.dump(key)).encode()]
        out.append(key)
        for value in values:
            if value is None:
                continue
            out.append(value)
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                envelope = json.loads(value)
                if envelope.get("properties", {}).get("body_encoding") == "base64":
                    out.append(base64.b64decode(envelope["body"]))
    return out


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_secrets_never_leak(tmp_path: Path) -> None:
    secret = {
        "TRADING_ALPACA_API_KEY": "AKEY" + secrets.token_hex(12),
        "TRADING_ALPACA_SECRET_KEY": "ASECRET" + secrets.token_hex(16),
        "TRADING_POLYGON_API_KEY": "PKEY" + secrets.token_hex(16),
        "TRADING_FLOWER_PASSWORD": "FPW" + secrets.token_hex(16),
    }
    seen: dict[str, bytes] = {}
    with flower_sim(tmp_path, {"TRADING_FLOWER_USER": "ops", **secret}, days=1) as sim:
        auth = (sim.user, sim.password)
        # the secrets did reach the cluster's processes (else this test proves nothing)
        environs = b"".join(_read(p) for p in Path("/proc").glob("[0-9]*/environ"))
        assert secret["TRADING_POLYGON_API_KEY"].encode() in environs

        wait_for(lambda: set(CHAIN) <= sim.task_names(), 90, "tick, score and decide in Flower")
        workers = sim.api("/api/workers?refresh=1")
        tasks = sim.api("/api/tasks?limit=5000")
        assert isinstance(tasks, dict) and isinstance(workers, dict)
        decides = [t for t in tasks.values() if t["name"] == "tasks.decide" and t.get("args")]
        assert decides, "no decide task with its arguments in Flower"
        paths = ["/", "/workers", "/tasks", "/broker", "/api/task/types", "/api/queues/length",
                 "/metrics", "/tasks/datatable?draw=1&start=0&length=1000&order[0][column]=0"
                 "&order[0][dir]=desc&columns[0][data]=received"]
        paths += [f"/worker/{name}" for name in workers]
        by_name: dict[str, list[str]] = {}
        for task_id, task in tasks.items():
            by_name.setdefault(task["name"], []).append(task_id)
        paths += [f"/api/task/info/{tid}" for ids in by_name.values() for tid in ids[:5]]
        for path in paths:
            status, body = sim.get(path, auth)
            assert status == 200, (path, status)
            seen[f"flower {path}"] = body
        seen["flower /api/workers"] = json.dumps(workers).encode()
        seen["flower /api/tasks"] = json.dumps(tasks).encode()
        if CHROMIUM is not None:
            seen["chromium /tasks"] = chromium_dom(
                tmp_path, f"http://{sim.user}:{sim.password}@127.0.0.1:{sim.port}/tasks").encode()
        for i, value in enumerate(_redis_values(sim.redis_url)):
            seen[f"redis during the run #{i}"] = value
        sim.proc.wait(180)  # a short run: one synthetic day at 600x
        assert sim.proc.returncode == 0, sim.stdout.read_text()[-3000:]
        for i, value in enumerate(_redis_values(sim.redis_url)):
            seen[f"redis after the run #{i}"] = value

    assert (sim.out / "logs" / "flower.log").exists()
    assert (sim.out / "logs" / "worker-exec.log").stat().st_size > 0
    seen.update(_files(sim.out))
    leaks = [(name, where) for name, value in secret.items() for where, blob in seen.items()
             if value.encode() in blob]
    assert not leaks, leaks
    # what the sim prints: the keys never; the Flower password is printed by `daytrader sim`
    # itself as the login to use (core/cli.py), so it is not checked there
    printed = sim.stdout.read_bytes()
    for name, value in secret.items():
        if name != "TRADING_FLOWER_PASSWORD":
            assert value.encode() not in printed, name


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:  # a process that ended, or one of another user
        return b""
