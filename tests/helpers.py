"""Helpers shared by the integration and end-to-end tests."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterable

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
