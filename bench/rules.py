"""Time to evaluate every rule and exit for the whole universe at the last bar of the day.

Usage::

    .venv/bin/python bench/rules.py [--symbols 100 1000 5000] [--repeat 30] [--budget-s 4]
                                    [--seed 7]

For each universe size the script generates one synthetic day of 390 one-minute bars
(``core.market.synthetic.generate_days``), lays it out field-major as the cluster's bar window
does (``core/market/bar_store.py`` ``BarWindow``) and times ``core.scoring.score_bar`` at the
last bar (ORB and VWAP entries for every symbol, then the exits of the held positions) with the
default ``ScoringParams()``, for three position books:

* ``none``: no position;
* ``10 held``: ten positions, long and short, entered over the morning;
* ``all held``: every symbol held, half long and half short, entries spread from 09:31 to noon.

Each case runs once to warm up, then up to ``--repeat`` times or until ``--budget-s`` seconds
have passed (at least 3 runs); the table shows the best and the median run in ms. The same runs
are repeated on cupy when ``import cupy`` works and a GPU answers, with the window copied to
the device once (the copy is not timed), and a note is printed otherwise. Measures only: no
Redis, no files written.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # runnable as `.venv/bin/python bench/rules.py`
    sys.path.insert(0, str(REPO))

from core.brokers.base import Position  # noqa: E402
from core.exits import ExtremeTracker  # noqa: E402
from core.market.synthetic import generate_days  # noqa: E402
from core.models import CLOSE, DayBars  # noqa: E402
from core.scoring import ScoringParams, held_exits, score_bar  # noqa: E402
from core.signals.orb import orb_signals  # noqa: E402
from core.signals.vwap import vwap_signals  # noqa: E402

DAY = dt.date(2025, 11, 24)
GOAL_SYMBOLS = 1000
GOAL_MS = 10.0
MORNING_BARS = 150  # 09:30 + 150 min = 12:00


def field_major(ohlcv: Any, xp: ModuleType) -> Any:
    """[T, S, 5] view of a field-major [5, T, S] buffer, as the cluster keeps its window."""
    return xp.ascontiguousarray(ohlcv.transpose(2, 0, 1)).transpose(1, 2, 0)


def book(day: DayBars, n_held: int) -> dict[str, Position]:
    """``n_held`` positions (every other one short), entries spread over the morning, each at
    the open of its entry bar at that bar's open price."""
    n = min(n_held, len(day.symbols))
    entries = np.linspace(1, MORNING_BARS, n).astype(int) if n else np.zeros(0, dtype=int)
    out: dict[str, Position] = {}
    for k in range(n):
        sym, bar = day.symbols[k], int(entries[k])
        price = float(day.ohlcv[bar, k, 0])
        if not np.isfinite(price):
            price = float(np.nanmean(day.ohlcv[:, k, CLOSE]))
        qty = 10 if k % 2 == 0 else -10
        out[sym] = Position(symbol=sym, qty=qty, avg_price=f"{price:.2f}",
                            opened_at=day.bar_time(bar).isoformat(),
                            session_date=day.date.isoformat(),
                            entry_client_order_id=f"bench-{sym}-{'L' if qty > 0 else 'S'}")
    return out


def timed(fn: Callable[[], Any], repeat: int, budget_s: float,
          sync: Callable[[], None]) -> tuple[list[float], Any]:
    """Run times in ms (after one warm-up run) and the last result."""
    result = fn()
    sync()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeat and (len(times) < 3 or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        result = fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return times, result


def stage_medians(window: Any, day: DayBars, positions: dict[str, Position],
                  params: ScoringParams, xp: ModuleType, args: argparse.Namespace,
                  sync: Callable[[], None], marks: dict[str, float]) -> tuple[float, ...]:
    """Median ms of score_bar's three stages at the last bar."""
    bar_time = day.bar_time(day.n_bars - 1)
    calls = [
        functools.partial(orb_signals, window, day.symbols, bar_time, params.orb, xp),
        functools.partial(vwap_signals, window, day.symbols, bar_time, params.vwap, xp),
        functools.partial(held_exits, window, day.symbols, day.open_time, day.bar_seconds,
                          positions, params.exits, marks, None, xp),
    ]
    return tuple(statistics.median(timed(c, args.repeat, args.budget_s / 3, sync)[0])
                 for c in calls)


def gpu_module() -> tuple[ModuleType | None, str]:
    """cupy when it imports and a GPU answers, else None and why."""
    try:
        import cupy  # type: ignore[import-not-found]
    except Exception as exc:  # any import failure (no wheel, no CUDA library) means no GPU run
        return None, f"cupy not importable ({type(exc).__name__}: {exc})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return None, f"cupy imports but no GPU answers ({type(exc).__name__}: {exc})"
    if count < 1:
        return None, "cupy imports but sees no GPU"
    name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
    return cupy, name.decode() if isinstance(name, bytes) else str(name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--symbols", type=int, nargs="+", default=[100, 1000, 5000])
    ap.add_argument("--repeat", type=int, default=30, help="timed runs per case, at most")
    ap.add_argument("--budget-s", type=float, default=4.0, help="time per case, about")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args(argv)

    params = ScoringParams()
    cupy, gpu_note = gpu_module()
    backends: list[tuple[str, ModuleType]] = [("numpy", np)]
    if cupy is not None:
        backends.append(("cupy", cupy))
    print(f"score_bar at the last of 390 one-minute bars, default ScoringParams(); "
          f"os.cpu_count()={os.cpu_count()}; numpy {np.__version__}")
    print(f"GPU: {gpu_note}" if cupy is not None else f"GPU: skipped, {gpu_note}")
    print()
    header = (f"{'backend':<7} {'symbols':>7} {'positions':>17} {'best ms':>9} {'median ms':>10}"
              f" {'runs':>5} {'signals':>8} {'exits':>6}")
    print(header)
    print("-" * len(header))
    goal: dict[str, float] = {}
    stages: dict[tuple[str, int], tuple[float, float, float]] = {}
    for n_sym in args.symbols:
        day = generate_days([DAY], n_sym, seed=args.seed)[0]
        books = [("none", {}), ("10 held", book(day, 10)), ("all held", book(day, n_sym))]
        for name, xp in backends:
            window = field_major(day.ohlcv if xp is np else xp.asarray(day.ohlcv), xp)
            sync = (lambda: None) if xp is np else xp.cuda.Stream.null.synchronize
            for label, positions in books:
                run = functools.partial(score_bar, window, day.symbols, day.open_time,
                                        day.bar_seconds, positions, params, xp=xp)
                times, scored = timed(run, args.repeat, args.budget_s, sync)
                best, median = min(times), statistics.median(times)
                held = f"{label} ({len(positions)})" if positions else label
                print(f"{name:<7} {n_sym:>7} {held:>17} {best:>9.2f} {median:>10.2f}"
                      f" {len(times):>5} {len(scored.signals):>8} {len(scored.exits):>6}",
                      flush=True)
                if n_sym == GOAL_SYMBOLS:
                    goal[f"{name} {label}"] = median
                if positions and len(positions) == n_sym:
                    stages[(name, n_sym)] = stage_medians(window, day, positions, params, xp,
                                                          args, sync, scored.marks)
                    # tick to tick, as the scoring worker runs: its ExtremeTracker saw the
                    # previous bar (untimed), so the exits update incrementally
                    times = []
                    for _ in range(min(args.repeat, 15)):
                        tracker = ExtremeTracker()
                        score_bar(window[:-1], day.symbols, day.open_time, day.bar_seconds,
                                  positions, params, xp=xp, tracker=tracker)
                        sync()
                        t0 = time.perf_counter()
                        scored = score_bar(window, day.symbols, day.open_time,
                                           day.bar_seconds, positions, params, xp=xp,
                                           tracker=tracker)
                        sync()
                        times.append((time.perf_counter() - t0) * 1e3)
                    best, median = min(times), statistics.median(times)
                    held = f"tick-to-tick ({len(positions)})"
                    print(f"{name:<7} {n_sym:>7} {held:>17} {best:>9.2f} {median:>10.2f}"
                          f" {len(times):>5} {len(scored.signals):>8} {len(scored.exits):>6}",
                          flush=True)
                    if n_sym == GOAL_SYMBOLS:
                        goal[f"{name} all held, tick-to-tick"] = median
    print()
    print("median ms per stage, every symbol held: orb_signals / vwap_signals / held_exits")
    for (name, n_sym), (orb, vwap, exits) in stages.items():
        print(f"  {name:<7} {n_sym:>5} symbols: {orb:7.2f} / {vwap:7.2f} / {exits:7.2f}")
    print()
    if goal:
        for case, median in goal.items():
            print(f"goal: {GOAL_SYMBOLS:,} symbols under {GOAL_MS:.0f} ms on 2 CPU cores; "
                  f"{case}: median {median:.2f} ms = {median / GOAL_MS:.2f}x the goal "
                  f"({'met' if median < GOAL_MS else 'missed'}; os.cpu_count()={os.cpu_count()})")
    else:
        print(f"goal: {GOAL_SYMBOLS:,} symbols under {GOAL_MS:.0f} ms on 2 CPU cores "
              f"(not measured: add {GOAL_SYMBOLS} to --symbols)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
