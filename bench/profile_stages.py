"""Where a bar's time goes inside the engine, without Celery: each stage run in-process.

Usage::

    .venv/bin/python bench/profile_stages.py [--symbols 500] [--bars 200] [--warmup 20]
                                             [--cprofile]

Starts a private Redis, prepares the same synthetic replay as ``bench/tick_latency.py`` and
runs, per bar, the engine functions the tasks call: ``engine.tick`` (advance + fills),
``engine.score``, ``decide_step.decide_bar`` and each ``execution.submit_order`` /
``execution.close_position``, timing each with ``time.perf_counter``. A dispatcher records what
would have been enqueued instead of sending it. Also times the JSON encoding of the messages
(Celery's serializer) and counts Redis round trips per stage. ``--cprofile`` prints the top
functions of each stage.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time
import uuid
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


class Recorder:
    """Dispatcher that keeps the payloads instead of enqueueing them."""

    def __init__(self) -> None:
        self.score_payloads: list[dict] = []
        self.orders: list[tuple[str, dict]] = []

    def score(self, payload: dict) -> None:
        self.score_payloads.append(payload)

    def submit_order(self, intent: dict) -> None:
        self.orders.append(("submit", intent))

    def close_position(self, intent: dict) -> None:
        self.orders.append(("close", intent))


class CountingRedis:
    """Counts commands sent by a redis client (wraps execute_command and pipelines)."""

    def __init__(self, client) -> None:
        self.n = 0
        orig = client.execute_command

        def execute_command(*a, **kw):
            self.n += 1
            return orig(*a, **kw)

        client.execute_command = execute_command
        orig_pipeline = client.pipeline

        def pipeline(*a, **kw):
            pipe = orig_pipeline(*a, **kw)
            orig_exec = pipe.execute

            def execute(*ea, **ekw):
                self.n += 1  # one round trip for the whole pipeline
                return orig_exec(*ea, **ekw)

            pipe.execute = execute
            return pipe

        client.pipeline = pipeline


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--symbols", type=int, default=500)
    p.add_argument("--bars", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--cprofile", action="store_true")
    args = p.parse_args(argv)
    os.chdir(REPO)
    sys.path.insert(0, str(REPO))

    from core.cluster import PrivateRedis

    server = PrivateRedis.start()
    try:
        os.environ.update({
            "TRADING_MODE": "sim", "TRADING_REDIS_URL": server.url,
            "TRADING_SIM_RUN_ID": f"prof-{uuid.uuid4().hex[:8]}",
            "TRADING_SIM_SYNTHETIC_SYMBOLS": str(args.symbols), "TRADING_SIM_DAYS": "1",
            "TRADING_DAILY_POSITION_LIMIT": "100000000", "TRADING_MAX_OPEN_POSITIONS": "100000",
            "TRADING_DAILY_LOSS_LIMIT": "100000000", "TRADING_SIM_STARTING_CASH": "1000000000",
            "TRADING_RISK_PCT_PER_TRADE": "0.00001", "TRADING_SIM_SETTLE_TIMEOUT_S": "3600",
        })
        for k in ("TRADING_SIM_DATA", "TRADING_SIM_SYMBOLS"):
            os.environ.pop(k, None)
        from core import decide_step, engine, execution
        from core.config import load_settings
        from core.runtime import build_runtime
        from core.sim import prepare_replay

        settings = load_settings()
        # One runtime per worker role, as in the cluster (each has its own caches).
        rt_exec, rt_gpu = build_runtime(settings), build_runtime(settings)
        prepare_replay(rt_exec, settings)
        counters = {"exec": CountingRedis(rt_exec.redis), "gpu": CountingRedis(rt_gpu.redis)}

        times: dict[str, list[float]] = defaultdict(list)
        calls: dict[str, list[int]] = defaultdict(list)
        profs = {name: cProfile.Profile() for name in ("tick", "score", "decide", "order")}
        sizes: dict[str, list[int]] = defaultdict(list)

        def timed(name, role, fn, *a):
            c = counters[role]
            n0 = c.n
            prof = profs[name] if args.cprofile else None
            t = time.perf_counter()
            if prof:
                prof.enable()
            out = fn(*a)
            if prof:
                prof.disable()
            dt_ = time.perf_counter() - t
            return out, dt_, c.n - n0

        for bar in range(args.bars):
            rec = Recorder()
            row: dict[str, float] = {}
            ncalls: dict[str, int] = {}
            res, row["tick"], ncalls["tick"] = timed("tick", "exec", engine.tick, rt_exec, rec)
            assert res["status"] == "advanced", res
            payload = rec.score_payloads[0]
            scored, row["score"], ncalls["score"] = timed("score", "gpu", engine.score,
                                                          rt_gpu, payload)
            t = time.perf_counter()
            blob = json.dumps(scored)
            json.loads(blob)
            row["json scored"] = time.perf_counter() - t
            sizes["scored"].append(len(blob))
            _, row["decide"], ncalls["decide"] = timed("decide", "exec", decide_step.decide_bar,
                                                       rt_exec, rec, scored)
            order_t, order_first, n_order_calls = 0.0, None, 0
            for kind, intent in rec.orders:
                fn = execution.submit_order if kind == "submit" else execution.close_position
                _, d, n = timed("order", "exec", fn, rt_exec, intent)
                order_first = d if order_first is None else order_first
                order_t += d
                n_order_calls += n
            st = rt_exec.replay.state()
            assert st.settled == bar, (st, bar)
            if bar < args.warmup:
                continue
            for k, v in row.items():
                times[k].append(v * 1000)
            for k, v in ncalls.items():
                calls[k].append(v)
            if rec.orders:
                times["first order"].append(order_first * 1000)
                times["all orders of bar"].append(order_t * 1000)
                times["orders per bar"].append(len(rec.orders))
                calls["order (each)"].append(n_order_calls / len(rec.orders))

        print(f"\n{args.symbols} symbols, {len(times['tick'])} bars measured (in-process, "
              "no Celery; ms)")
        print(f"{'stage':<20} {'p50':>8} {'p90':>8} {'p99':>8} {'max':>8} {'n':>5} "
              f"{'redis calls p50':>16}")
        for k in ("tick", "score", "json scored", "decide", "first order", "all orders of bar",
                  "orders per bar"):
            v = np.asarray(times[k]) if times[k] else np.asarray([np.nan])
            rc = {"first order": "order (each)"}.get(k, k)
            rcalls = f"{np.median(calls[rc]):.0f}" if calls.get(rc) else ""
            print(f"{k:<20} {np.percentile(v, 50):8.2f} {np.percentile(v, 90):8.2f} "
                  f"{np.percentile(v, 99):8.2f} {v.max():8.2f} {len(times[k]):>5} {rcalls:>16}")
        sz = np.asarray(sizes["scored"])
        print(f"scored payload JSON: p50 {np.median(sz):.0f} B, max {sz.max()} B")
        print(f"open orders at end: {len(rt_exec.broker.list_open_orders())}, "
              f"positions: {len(rt_exec.broker.get_positions())}, "
              f"orders total: {len(rt_exec.broker.order_log())}")
        if args.cprofile:
            for name, prof in profs.items():
                s = io.StringIO()
                pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(18)
                print(f"\n===== cProfile: {name} (cumulative) =====")
                print("\n".join(s.getvalue().splitlines()[:45]))
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
