"""Helpers shared by the integration and end-to-end tests."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from core import execution
from core.config import load_settings
from core.runtime import Runtime, build_runtime
from core.sim import prepare_replay


def wait_for(pred: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``pred`` every 0.1 s until it is true; fail naming ``what`` after ``timeout`` s.

    A Redis that is down for a moment on purpose makes ``pred`` raise: that counts as false.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if pred():
                return
        except Exception:  # the thing polled may be restarting
            pass
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@contextlib.contextmanager
def eager_tasks(monkeypatch: Any, redis_url: str, run_id: str,
                **env: str) -> Iterator[Runtime]:
    """The tasks run eagerly in this process on a fresh runtime: simulated mode on the test
    Redis, 40 synthetic symbols, run ``run_id``, plus ``env`` (TRADING_* variables); the
    Celery app and the cached settings are restored afterwards."""
    from core.config import get_settings
    from tasks import app
    from tasks.runtime import get_runtime, reset_runtime

    monkeypatch.setenv("TRADING_REDIS_URL", redis_url)
    monkeypatch.setenv("TRADING_SIM_RUN_ID", run_id)
    monkeypatch.setenv("TRADING_SIM_SYNTHETIC_SYMBOLS", "40")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("TRADING_SIM_DATA", raising=False)
    get_settings.cache_clear()
    reset_runtime()
    app.conf.task_always_eager = True
    app.conf.task_eager_propagates = True
    try:
        yield get_runtime()
    finally:
        app.conf.task_always_eager = False
        app.conf.task_eager_propagates = False
        get_settings.cache_clear()
        reset_runtime()


def stop_process(proc: subprocess.Popen | None, sig: int = signal.SIGINT,
                 wait_s: float = 60) -> None:
    """Stop ``proc`` with ``sig`` if it still runs; kill it when it has not ended after
    ``wait_s`` seconds."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(wait_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def step(rt: Runtime) -> list:
    """Publish the next bar, fill what is due, let reservations follow, settle the bar."""
    st = rt.replay.state()
    meta = rt.replay.days()[st.day]
    adv = rt.replay.advance(st, rt.keys.tick_guard(meta.date, st.bar + 1), 0.0)
    assert adv.status == "advanced"
    events = rt.broker.process_bar(meta, adv.bar, adv.row)
    execution.apply_fill_events(rt, events)
    rt.replay.settle(meta.date, adv.bar)
    return events


def prepared_runtime(redis_url: str, run: str, bars: int = 20, days: list | None = None,
                     **overrides: object) -> Runtime:
    """A runtime over a stored replay (synthetic, 8 symbols unless ``days`` is given),
    advanced ``bars`` bars with no orders, and the day reconciled."""
    overrides.setdefault("sim_synthetic_symbols", 8)
    settings = load_settings(redis_url=redis_url, sim_run_id=run, **overrides)
    rt = build_runtime(settings)
    prepare_replay(rt, settings, days)
    for _ in range(bars):
        step(rt)
    execution.reconcile(rt, rt.replay.days()[0].date)
    return rt


def stop_processes(procs: Iterable[subprocess.Popen]) -> None:
    """SIGTERM each process, wait up to 20 s, then SIGKILL what is left."""
    procs = list(procs)
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()


def random_walk_window(seed: int, n_bars: int = 120, n_sym: int = 6,
                       holes: bool = True) -> np.ndarray:
    """A seeded [T, S, 5] window of random-walk bars, with halted bars and odd volumes."""
    from core.models import CLOSE, HIGH, LOW, OPEN, VOLUME

    rng = np.random.default_rng(seed)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.002, (n_bars, n_sym)), axis=0))
    w = np.empty((n_bars, n_sym, 5))
    w[:, :, OPEN] = np.vstack([close[:1], close[:-1]])
    w[:, :, CLOSE] = close
    w[:, :, HIGH] = np.maximum(w[:, :, OPEN], close) * 1.001
    w[:, :, LOW] = np.minimum(w[:, :, OPEN], close) * 0.999
    w[:, :, VOLUME] = rng.integers(0, 5000, (n_bars, n_sym)).astype(float)
    if holes:  # halted bars, a missing volume and zero-volume bars
        w[rng.integers(0, n_bars, 8), rng.integers(0, n_sym, 8)] = np.nan
        w[5, 1, VOLUME] = np.nan
    return w


def busy_scoring_params() -> Any:
    """``ScoringParams`` whose rules fire often on ``random_walk_window`` bars (a 5-bar
    opening range, loose VWAP bands), for tests that need many signals."""
    from core.scoring import ScoringParams
    from core.signals.orb import OrbParams
    from core.signals.vwap import VwapParams

    return ScoringParams(orb=OrbParams(range_bars=5, volume_ratio=0.5),
                         vwap=VwapParams(band_k=1.0, max_trend_pct=0.05, min_bars=10,
                                         std_bars=10))
