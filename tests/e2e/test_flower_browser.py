"""Flower of a running simulated cluster, seen from a real headless Chromium and over HTTP.

``daytrader sim --flower`` runs as a subprocess against a private redis-server; Flower is
started through ``python -m core.flower`` with basic auth. Without the login Flower answers
401 (pages and ``/api/*``) and the browser shows no worker; with it (the
``http://user:password@host:port/`` URL form, which Chromium honours for the page and its
same-origin XHRs) the workers of the gpu and exec queues and the tasks tick/score/decide show.

Chromium comes from the distribution's ``chromium`` package (``make browser``); without it
the browser tests skip, the HTTP checks still run.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from core.cluster import free_port, redis_answers, redis_server_binary
from tests.conftest import REPO
from tests.helpers import stop_process, wait_for

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists()
                                        else None)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium not installed (`make browser` installs the Debian package `chromium`)")

CHAIN = ("tasks.tick", "tasks.score", "tasks.decide")


@dataclass
class FlowerSim:
    """A running ``daytrader sim --flower`` and how to reach its Flower."""

    proc: subprocess.Popen[bytes]
    port: int
    user: str
    password: str
    redis_url: str
    out: Path
    stdout: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str, auth: tuple[str, str] | None = None) -> tuple[int, bytes]:
        """GET ``path`` from Flower; (status, body), also for 4xx answers."""
        req = urllib.request.Request(self.base + path)
        if auth is not None:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def api(self, path: str) -> object:
        status, body = self.get(path, (self.user, self.password))
        assert status == 200, (path, status, body[:300])
        return json.loads(body)

    def task_names(self) -> set[str]:
        tasks = self.api("/api/tasks?limit=5000")
        return {t.get("name") for t in tasks.values()}  # type: ignore[union-attr]


def start_redis(tmp_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    workdir = tmp_path / "redis"
    workdir.mkdir()
    proc = subprocess.Popen(
        [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    wait_for(lambda: redis_answers(url, 0.2), 10, "redis-server")
    return proc, url


@contextlib.contextmanager
def flower_sim(tmp_path: Path, extra_env: dict[str, str] | None = None,
               days: int = 3) -> Iterator[FlowerSim]:
    """Run ``daytrader sim --synthetic --flower`` until the block ends (then SIGINT: the sim
    stops its cluster and writes what ran). Flower's login comes from ``extra_env`` when it
    sets TRADING_FLOWER_USER/PASSWORD, else a random one."""
    server, url = start_redis(tmp_path)
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TRADING_", "FLOWER_", "CELERY_"))}
    env.update({"TRADING_REDIS_URL": url, "PYTHONUNBUFFERED": "1",
                "TRADING_FLOWER_USER": "ops",
                "TRADING_FLOWER_PASSWORD": "pw-" + secrets.token_urlsafe(16),
                "TRADING_FLOWER_PORT": str(port), **(extra_env or {})})
    out = tmp_path / "out"
    stdout = tmp_path / "sim-output.txt"
    with stdout.open("wb") as sink:
        proc = subprocess.Popen(
            [str(BIN / "daytrader"), "sim", "--synthetic", "--synthetic-symbols", "10",
             "--speed", "600", "--days", str(days), "--flower", "--out", str(out), "--quiet"],
            env=env, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT)
    sim = FlowerSim(proc, port, env["TRADING_FLOWER_USER"], env["TRADING_FLOWER_PASSWORD"],
                    url, out, stdout)
    try:
        def flower_up() -> bool:
            assert proc.poll() is None, stdout.read_text()[-3000:]
            return sim.get("/healthcheck")[0] == 200

        wait_for(flower_up, 90, "Flower to answer")
        yield sim
    finally:
        stop_process(proc, signal.SIGINT, 90)
        server.terminate()
        server.wait(10)


def chromium_dom(tmp_path: Path, url: str, budget_ms: int = 5000) -> str:
    """The DOM of ``url`` after its scripts ran, from a fresh profile (no cached login)."""
    profile = tmp_path / f"chromium-{secrets.token_hex(4)}"
    cmd = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--no-default-browser-check", "--disable-extensions", f"--user-data-dir={profile}",
           f"--virtual-time-budget={budget_ms}", "--dump-dom", url]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, f"chromium failed ({proc.returncode}): {proc.stderr[-2000:]}"
    return proc.stdout


def worker_names(text: str) -> set[str]:
    return set(re.findall(r"\b((?:gpu|exec)-[0-9a-f]+@[\w.-]+)", text))


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FlowerSim]:
    with flower_sim(tmp_path_factory.mktemp("flower")) as sim:
        # the first bars went through the whole chain and Flower saw them
        wait_for(lambda: set(CHAIN) <= sim.task_names(), 90, "tick, score and decide in Flower")
        yield sim


def test_http_refused_without_login(running: FlowerSim) -> None:
    for path in ("/", "/workers", "/tasks", "/broker", "/api/workers", "/api/tasks",
                 "/api/queues/length", "/tasks/datatable"):
        status, body = running.get(path)
        assert status == 401, (path, status)
        assert b"gpu-" not in body and b"exec-" not in body, path
        assert running.get(path, (running.user, running.password + "x"))[0] == 401, path
        assert running.get(path, ("someone", running.password))[0] == 401, path
    assert running.get("/api/workers", (running.user, running.password))[0] == 200
    # refresh=1: Flower asks the workers now (inspect) instead of answering from its cache
    wait_for(lambda: {n.split("-")[0] for n in running.api("/api/workers?refresh=1")}
             >= {"gpu", "exec"}, 30, "the gpu and exec workers in /api/workers")


def test_password_is_not_on_any_command_line(running: FlowerSim) -> None:
    secret = running.password.encode()
    seen = 0
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            assert secret not in cmdline.read_bytes(), cmdline
            seen += 1
    assert seen > 0


@needs_chromium
def test_browser_without_login_sees_no_worker(running: FlowerSim, tmp_path: Path) -> None:
    for url in (f"{running.base}/", f"{running.base}/workers",
                f"http://{running.user}:wrong-{running.password}@127.0.0.1:{running.port}/"):
        dom = chromium_dom(tmp_path, url)
        assert not worker_names(dom), url
        assert "worker-name" not in dom and "tasks.tick" not in dom, url


@needs_chromium
def test_browser_login_lists_gpu_and_exec_workers(running: FlowerSim, tmp_path: Path) -> None:
    api_names = set(running.api("/api/workers?refresh=1"))  # type: ignore[arg-type]
    url = f"http://{running.user}:{running.password}@127.0.0.1:{running.port}/workers"
    dom = chromium_dom(tmp_path, url)
    assert "<title>" in dom and "Flower" in dom
    shown = worker_names(dom)
    assert {n.split("-")[0] for n in shown} == {"gpu", "exec"}, shown
    assert shown <= api_names, (shown, api_names)


@needs_chromium
def test_browser_tasks_page_shows_tick_score_decide(running: FlowerSim, tmp_path: Path) -> None:
    url = f"http://{running.user}:{running.password}@127.0.0.1:{running.port}/tasks"
    uuid = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
    for name in CHAIN:
        # rows of the task table (filled by the page's script from /tasks/datatable)
        row = re.compile(rf'<tr id="{uuid}"[^>]*>\s*<td>\s*<a [^>]*>{re.escape(name)}</a>')
        dom = chromium_dom(tmp_path, f"{url}?name={name}")
        assert row.search(dom), f"no {name} row on the tasks page"


def test_cluster_restarts_flower_with_its_login(tmp_path: Path) -> None:
    """Cluster.start_flower runs ``python -m core.flower``; a restart keeps the login."""
    from core.cluster import Cluster

    server, url = start_redis(tmp_path)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TRADING_", "FLOWER_", "CELERY_"))}
    env.update(TRADING_REDIS_URL=url, PYTHONUNBUFFERED="1")
    cluster = Cluster(env=env, log_dir=tmp_path / "logs")
    port, password = free_port(), "pw-" + secrets.token_urlsafe(12)
    sim = FlowerSim(None, port, "ops", password, url, tmp_path, tmp_path)  # type: ignore[arg-type]
    try:
        cluster.start_flower(port, "ops", password)
        for attempt in range(2):
            wait_for(lambda: sim.get("/healthcheck")[0] == 200, 60, "Flower to answer")
            assert sim.get("/api/workers")[0] == 401
            assert sim.get("/api/workers", ("ops", password))[0] == 200
            cmdline = Path(f"/proc/{cluster.procs['flower'].pid}/cmdline").read_bytes()
            # core.flower exec'd Flower: same process, Flower's command line, no secret in it
            assert b"\0flower\0" in cmdline and f"--port={port}".encode() in cmdline
            assert password.encode() not in cmdline
            if attempt == 0:
                os.killpg(cluster.procs["flower"].pid, signal.SIGKILL)
                cluster.procs["flower"].wait(10)
                assert cluster.dead() == ["flower"]
                cluster.restart("flower")
        log = (tmp_path / "logs" / "flower.log").read_text()
        assert log.count("basic auth for user 'ops'") == 2 and password not in log
    finally:
        cluster.stop()
        server.terminate()
        server.wait(10)
