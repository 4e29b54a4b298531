"""Reservations per second through the Lua daily-limit script versus a plain INCRBY.

Usage::

    .venv/bin/python bench/reservations.py [--rounds 3] [--n1 20000] [--n8 5000]

Starts a private Redis (never the developer's) and 8 client processes (multiprocessing
spawn, each with its own ``connect_redis`` client, no pipelining). For 1 and for 8 client
processes it times:

* ``reserve``: ``RedisDailyLimitStore.reserve`` with unique client_order_ids, 100 cents each,
  a limit of 10**14 cents (never refuses);
* ``INCRBY``: ``INCRBY <key> 100`` on one key, the same client settings and counts.

1 process does ``--n1`` calls, each of 8 processes ``--n8``. Every process warms up (connect,
script load) first, waits on a shared barrier, and the time runs from the earliest start to
the latest finish (``perf_counter`` is CLOCK_MONOTONIC on Linux, shared by all processes).
The table shows the median over ``--rounds`` rounds (the order of the two ops alternates per
round) and the ratio reserve/INCRBY against the goal (>= 0.5x). It also checks, with INFO
commandstats, that reserve runs as EVALSHA (script cached on the server, not resent) and how
many microseconds of server time each command costs. Always exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import queue
import signal
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

DAY = dt.date(2024, 6, 3)
LIMIT_CENTS = 10**14
AMOUNT_CENTS = 100
WARMUP = 500  # calls per process before the barrier
PROCS = (1, 8)
GOAL = 0.5
PREFIX = "bench:"


def _worker(wid: int, url: str, tasks: Any, results: Any, barriers: dict[int, Any]) -> None:
    """One client process: runs (op, n, parties, run_id) commands until it gets None."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us
    from core.keys import Keys
    from core.risk_store import RedisDailyLimitStore
    from core.runtime import connect_redis

    r = connect_redis(url)
    store = RedisDailyLimitStore(r, Keys(prefix=PREFIX))
    incr_key = Keys(prefix=PREFIX).k("incr")
    parent = os.getppid()
    while True:
        try:
            task = tasks.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:  # the parent died without telling us
                return
            continue
        if task is None:
            return
        op, n, parties, run_id = task
        try:
            if op == "reserve":
                def one(i: str) -> None:
                    store.reserve(DAY, i, AMOUNT_CENTS, LIMIT_CENTS)
            else:
                def one(i: str) -> None:
                    r.incrby(incr_key, AMOUNT_CENTS)
            base = f"r{run_id}-w{wid}-"
            for i in range(WARMUP):
                one(f"{base}warm{i}")
            ids = [f"{base}{i}" for i in range(n)]  # built before the clock starts
            barriers[parties].wait(60)
            t0 = time.perf_counter()
            for i in ids:
                one(i)
            t1 = time.perf_counter()
            results.put((wid, t0, t1, None))
        except Exception as exc:  # report, the parent decides
            results.put((wid, 0.0, 0.0, f"{type(exc).__name__}: {exc}"))


@dataclass
class Run:
    op: str
    procs: int
    ops: int
    seconds: float
    stats: dict[str, tuple[int, float]]  # command -> (calls, usec) during the run

    @property
    def rate(self) -> float:
        return self.ops / self.seconds


def _commandstats(client: Any) -> dict[str, tuple[int, float]]:
    raw = client.info("commandstats")
    return {k.removeprefix("cmdstat_"): (int(v["calls"]), float(v["usec"]))
            for k, v in raw.items()}


def _delta(before: dict[str, tuple[int, float]],
           after: dict[str, tuple[int, float]]) -> dict[str, tuple[int, float]]:
    out = {}
    for cmd, (calls, usec) in after.items():
        c0, u0 = before.get(cmd, (0, 0.0))
        if calls - c0:
            out[cmd] = (calls - c0, usec - u0)
    return out


class Pool:
    """8 spawned client processes, reused for every run."""

    def __init__(self, url: str, size: int) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.barriers = {p: ctx.Barrier(p) for p in PROCS}
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(size)]
        self.procs = [ctx.Process(target=_worker, daemon=True,
                                  args=(w, url, self.tasks[w], self.results, self.barriers))
                      for w in range(size)]
        for p in self.procs:
            p.start()
        self.run_id = 0

    def run(self, client: Any, op: str, procs: int, n: int) -> Run:
        self.run_id += 1
        client.flushdb()
        before = _commandstats(client)
        for w in range(procs):
            self.tasks[w].put((op, n, procs, self.run_id))
        got = [self.results.get(timeout=120) for _ in range(procs)]
        stats = _delta(before, _commandstats(client))
        errors = [e for *_, e in got if e]
        if errors:
            raise RuntimeError(f"{op} x{procs}: {errors[0]}")
        seconds = max(t1 for _, _, t1, _ in got) - min(t0 for _, t0, _, _ in got)
        total = procs * n
        want = procs * (n + WARMUP) * AMOUNT_CENTS
        if op == "reserve":
            used = int(client.get(f"{PREFIX}daily_used_capital:{DAY.isoformat()}") or 0)
        else:
            used = int(client.get(f"{PREFIX}incr") or 0)
        if used != want:
            raise RuntimeError(f"{op} x{procs}: counter {used} != expected {want}")
        return Run(op, procs, total, seconds, stats)

    def stop(self) -> None:
        for q in self.tasks:
            with contextlib.suppress(Exception):
                q.put(None)
        deadline = time.monotonic() + 5
        for p in self.procs:
            p.join(max(0.1, deadline - time.monotonic()))
            if p.is_alive():
                p.terminate()
                p.join(2)


def _cmd_cost(stats: dict[str, tuple[int, float]], cmd: str) -> str:
    calls, usec = stats.get(cmd, (0, 0.0))
    return f"{calls} {cmd.upper()}" + (f" ({usec / calls:.1f} us each)" if calls else "")


def print_report(runs: list[Run], n_by_procs: dict[int, int]) -> None:
    def med(op: str, procs: int) -> float | None:
        rates = [r.rate for r in runs if r.op == op and r.procs == procs]
        return statistics.median(rates) if rates else None

    print()
    print(f"{'':<22}" + "".join(f"{f'{p} proc' + ('s' if p > 1 else ''):>16}" for p in PROCS))
    for op, label in (("reserve", "reserve ops/s"), ("incr", "INCRBY ops/s")):
        cells = [med(op, p) for p in PROCS]
        print(f"{label:<22}" + "".join(f"{c:>16,.0f}" if c else f"{'-':>16}" for c in cells))
    cells = []
    for p in PROCS:
        res, inc = med("reserve", p), med("incr", p)
        if res and inc:
            ratio = res / inc
            cells.append(f"{ratio:.2f}x {'PASS' if ratio >= GOAL else 'MISS'}")
        else:
            cells.append("-")
    print(f"{'reserve / INCRBY':<22}" + "".join(f"{c:>16}" for c in cells)
          + f"   (goal >= {GOAL}x)")
    rounds = max((sum(1 for r in runs if r.op == "incr" and r.procs == 1)), 1)
    print(f"(median of {rounds} round(s); calls per process: "
          + ", ".join(f"{p} proc: {n_by_procs[p]:,}" for p in PROCS) + ")")
    print("\nper round, ops/s:")
    for p in PROCS:
        for op in ("reserve", "incr"):
            rates = [f"{r.rate:,.0f}" for r in runs if r.op == op and r.procs == p]
            print(f"  {op:<8} x{p}: {', '.join(rates)}")
    print("\nserver side (INFO commandstats, first round, warm-up included):")
    for p in PROCS:
        for op in ("reserve", "incr"):
            first = next((r for r in runs if r.op == op and r.procs == p), None)
            if first is None:
                continue
            calls = p * (n_by_procs[p] + WARMUP)
            if op == "reserve":
                s = first.stats
                ok = s.get("evalsha", (0, 0))[0] >= calls and s.get("eval", (0, 0))[0] == 0
                print(f"  reserve x{p}: {calls} reserve calls -> {_cmd_cost(s, 'evalsha')}, "
                      f"{_cmd_cost(s, 'eval')}, {_cmd_cost(s, 'script|load')}"
                      f"{'' if 'script|load' in s else ', ' + _cmd_cost(s, 'script')}"
                      f"  => {'EVALSHA in use' if ok else 'NOT only EVALSHA'}")
            else:
                print(f"  INCRBY  x{p}: {calls} calls -> {_cmd_cost(first.stats, 'incrby')}")


def _raise_interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--n1", type=int, default=20_000, help="calls for the 1-process runs")
    p.add_argument("--n8", type=int, default=5_000, help="calls per process, 8-process runs")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)

    from core.cluster import PrivateRedis
    from core.runtime import connect_redis

    n_by_procs = {1: args.n1, 8: args.n8}
    server = pool = None
    runs: list[Run] = []
    started = time.monotonic()
    try:
        server = PrivateRedis.start()
        client = connect_redis(server.url)
        print(f"private Redis {client.info('server')['redis_version']} at {server.url}; "
              f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs",
              file=sys.stderr)
        pool = Pool(server.url, max(PROCS))
        for rnd in range(args.rounds):
            order = ("reserve", "incr") if rnd % 2 == 0 else ("incr", "reserve")
            for procs in PROCS:
                for op in order:
                    run = pool.run(client, op, procs, n_by_procs[procs])
                    runs.append(run)
                    print(f"round {rnd + 1}: {op:<7} x{procs}: {run.rate:>9,.0f} ops/s "
                          f"({run.ops:,} in {run.seconds:.2f} s)", file=sys.stderr)
        print_report(runs, n_by_procs)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        if runs:
            print_report(runs, n_by_procs)
    except Exception as exc:  # a benchmark reports and exits 0
        print(f"benchmark failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        if runs:
            print_report(runs, n_by_procs)
    finally:
        if pool is not None:
            pool.stop()
        if server is not None:
            server.stop()
    print(f"\n(took {time.monotonic() - started:.0f} s; load average now "
          f"{os.getloadavg()[0]:.2f})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
