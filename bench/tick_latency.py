"""Tick latency through the real queues versus a bare Celery chain of the same shape.

Usage::

    .venv/bin/python bench/tick_latency.py [--symbols 100 500] [--bars 200] [--warmup 20]
                                           [--chains 200]

For each universe size it starts a private Redis (never the developer's), a gpu worker
(``-c 1``) and an exec worker as real ``celery -A tasks worker`` processes, prepares a
synthetic one-day replay and then plays beat's role itself:

(a) tick path: for each bar, publish ``tasks.tick`` (the message beat sends) at wall time t0,
    busy-poll the replay state until that bar is settled, then read the bar's orders from the
    simulated broker. tick->order = min(accepted_wall) - t0 over the bar's orders (entries and
    exits, rejected ones left out); tick->settled = settled_at - t0. Both end stamps are taken
    by the workers, so the poll interval of this process does not enter the numbers.
(b) bare chain: exec -> gpu -> exec -> exec made of the empty ``tasks.ping`` (same hops as
    tick -> score -> decide -> submit), the last hop storing its result in the Redis backend;
    latency = date_done of that result - t0.

Prints a table with p50/p99 and the ratios against the goals (p50 <= 1.5x, p99 <= 2.0x the
bare chain). Always exits 0: it is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
POLL_S = 0.0005  # sleep between polls of Redis (busy-poll at most every 0.5 ms)
BAR_TIMEOUT_S = 30.0
P50_GOAL, P99_GOAL = 1.5, 2.0


@dataclass
class Result:
    symbols: int
    tick_order_ms: list[float] = field(default_factory=list)
    tick_settled_ms: list[float] = field(default_factory=list)
    chain_ms: list[float] = field(default_factory=list)
    measured_bars: int = 0
    last_bar: int = -1
    bars_with_orders: int = 0
    orders: int = 0
    entries: int = 0
    exits: int = 0
    rejected: int = 0
    errors: list[str] = field(default_factory=list)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def _sim_env(redis_url: str, run_id: str, n_symbols: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("TRADING_SIM_") or k in ("TRADING_SIM_SEED",)}
    env.update({
        "TRADING_MODE": "sim",
        "TRADING_REDIS_URL": redis_url,
        "TRADING_SIM_RUN_ID": run_id,
        "TRADING_SIM_SYNTHETIC_SYMBOLS": str(n_symbols),
        "TRADING_SIM_DAYS": "1",
        "TRADING_DAILY_POSITION_LIMIT": "100000000",
        "TRADING_MAX_OPEN_POSITIONS": "100000",
        # Size = limit x risk / stop: 0.00001 of $100M with a 1 % stop is ~$100k a position,
        # so the daily limit never runs out (the default 0.002 would stop entries after 5).
        "TRADING_RISK_PCT_PER_TRADE": "0.00001",
        # A slow bar must never be re-dispatched by the tick: that would add orders twice.
        "TRADING_SIM_SETTLE_TIMEOUT_S": "3600",
    })
    return env


def _wait_workers(app, names: list[str], cluster, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dead = cluster.dead()
        if dead:
            raise RuntimeError(f"worker exited at start: {dead}; see {cluster.log_dir}")
        replies = app.control.ping(destination=names, timeout=0.5) or []
        got = {name for r in replies for name in r}
        if all(n in got for n in names):
            return
    raise RuntimeError(f"workers did not answer within {timeout:.0f} s; see {cluster.log_dir}")


class OrderReader:
    """Reads the broker's order log incrementally (only ids it has not seen)."""

    def __init__(self, rt) -> None:
        self.rt = rt
        self.seen = 0
        self.by_bar: dict[int, list[dict]] = {}

    def pull(self) -> None:
        r, k = self.rt.redis, self.rt.keys
        ids = r.lrange(k.broker("order_log"), self.seen, -1)
        if not ids:
            return
        self.seen += len(ids)
        raws = r.hmget(k.broker("orders"), ids)
        for raw in raws:
            if raw:
                o = json.loads(raw)
                self.by_bar.setdefault(int(o["fill_after_bar"]), []).append(o)


def run_tick_path(app, rt, settings, cluster, res: Result, bars: int, warmup: int,
                  min_order_bars: int, tick_options: dict) -> None:
    replay = rt.replay
    state_key = rt.keys.replay_state()
    latency_bars = settings.sim_latency_bars
    n_bars = replay.days()[0].n_bars
    reader = OrderReader(rt)
    r = rt.redis
    # The day's last bar would roll the replay over (end of day): stop before it.
    for bar in range(n_bars - 1):
        if bar >= bars and res.bars_with_orders >= min_order_bars:
            break
        t0 = time.time()
        app.send_task("tasks.tick", **tick_options)
        deadline = time.monotonic() + BAR_TIMEOUT_S
        while True:
            settled, settled_at = r.hmget(state_key, "settled", "settled_at")
            if settled is not None and int(settled) >= bar:
                break
            if time.monotonic() > deadline:
                dead = cluster.dead()
                res.errors.append(f"bar {bar} not settled in {BAR_TIMEOUT_S:.0f} s"
                                  + (f" (dead: {dead})" if dead else ""))
                return
            time.sleep(POLL_S)
        st = replay.state()
        if st.bar != bar or st.settled != bar:
            res.errors.append(f"replay at bar {st.bar}/settled {st.settled}, expected {bar}")
            return
        reader.pull()
        if bar < warmup:
            continue
        res.measured_bars += 1
        res.last_bar = bar
        res.tick_settled_ms.append((float(settled_at) - t0) * 1000.0)
        orders = reader.by_bar.get(bar + latency_bars, [])
        live = [o for o in orders if o["status"] != "rejected"]
        res.rejected += len(orders) - len(live)
        if live:
            res.bars_with_orders += 1
            res.orders += len(live)
            res.entries += sum(1 for o in live if o["intent"] == "entry")
            res.exits += sum(1 for o in live if o["intent"] != "entry")
            res.tick_order_ms.append((min(o["accepted_wall"] for o in live) - t0) * 1000.0)


def run_bare_chains(app, rt, cluster, res: Result, n: int, warmup: int) -> None:
    from celery import chain

    def ping(queue: str, *args: object, **options: object):
        # Immutable (.si): a step does not receive its parent's result, like tasks.ping().si().
        return app.signature("tasks.ping", args=args, immutable=True).set(queue=queue, **options)

    r = rt.redis
    for i in range(warmup + n):
        c = chain(ping("exec"), ping("gpu"), ping("exec"),
                  ping("exec", {"seq": i}, ignore_result=False))
        t0 = time.time()
        result = c.apply_async()
        key = f"celery-task-meta-{result.id}"
        deadline = time.monotonic() + BAR_TIMEOUT_S
        while True:
            raw = r.get(key)
            if raw is not None:
                break
            if time.monotonic() > deadline:
                res.errors.append(f"bare chain {i} did not finish in {BAR_TIMEOUT_S:.0f} s"
                                  f" (dead: {cluster.dead()})")
                return
            time.sleep(POLL_S)
        meta = json.loads(raw)
        if meta.get("status") != "SUCCESS" or meta.get("result") != {"seq": i}:
            res.errors.append(f"bare chain {i}: unexpected result {meta}")
            return
        done = dt.datetime.fromisoformat(meta["date_done"])
        if done.tzinfo is None:
            done = done.replace(tzinfo=dt.UTC)
        r.delete(key)
        if i >= warmup:
            res.chain_ms.append((done.timestamp() - t0) * 1000.0)


def run_config(app, redis_url: str, n_symbols: int, args, log_root: Path) -> Result:
    from beat_schedule import build_schedule
    from core.cluster import Cluster
    from core.config import load_settings
    from core.runtime import build_runtime
    from core.sim import prepare_replay

    res = Result(n_symbols)
    run_id = f"bench-{n_symbols}-{uuid.uuid4().hex[:8]}"
    env = _sim_env(redis_url, run_id, n_symbols)
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        settings = load_settings()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    rt = build_runtime(settings)
    t = time.perf_counter()
    prepare_replay(rt, settings)
    print(f"[{n_symbols} symbols] replay prepared in {time.perf_counter() - t:.1f} s "
          f"(run {run_id}, {rt.replay.days()[0].n_bars} bars/day)", file=sys.stderr)
    tick_options = dict(build_schedule(settings)["tick"]["options"])
    tick_options["expires"] = max(tick_options.get("expires", 0), BAR_TIMEOUT_S)

    tag = run_id[-8:]
    cluster = Cluster(env=env, log_dir=log_root / f"{n_symbols}")
    try:
        cluster.start_workers(tag=tag)
        host = os.uname().nodename
        _wait_workers(app, [f"gpu-{tag}@{host}", f"exec-{tag}@{host}"], cluster)
        t = time.perf_counter()
        run_tick_path(app, rt, settings, cluster, res, args.bars, args.warmup,
                      args.min_order_bars, tick_options)
        print(f"[{n_symbols} symbols] tick path: {res.measured_bars} bars measured in "
              f"{time.perf_counter() - t:.1f} s", file=sys.stderr)
        t = time.perf_counter()
        run_bare_chains(app, rt, cluster, res, args.chains, args.warmup)
        print(f"[{n_symbols} symbols] bare chain: {len(res.chain_ms)} chains in "
              f"{time.perf_counter() - t:.1f} s", file=sys.stderr)
    finally:
        cluster.stop()
        rt.redis.close()
    return res


def verdict(ratio: float, goal: float) -> str:
    if not np.isfinite(ratio):
        return "n/a"
    return "PASS" if ratio <= goal else "MISS"


def print_table(results: list[Result]) -> None:
    print()
    print("Tick latency (beat fire -> ...) vs bare 4-hop chain exec->gpu->exec->exec, ms")
    hdr = (f"{'symbols':>7} | {'tick->order':^17} | {'tick->settled':^17} | "
           f"{'bare chain':^17} | {'p50 ratio (<=1.5)':^19} | {'p99 ratio (<=2.0)':^19}")
    sub = (f"{'':>7} | {'p50':>8} {'p99':>8} | {'p50':>8} {'p99':>8} | {'p50':>8} {'p99':>8} | "
           f"{'':^19} | {'':^19}")
    print(hdr)
    print(sub)
    print("-" * len(hdr))
    for r in results:
        o50, o99 = pct(r.tick_order_ms, 50), pct(r.tick_order_ms, 99)
        s50, s99 = pct(r.tick_settled_ms, 50), pct(r.tick_settled_ms, 99)
        c50, c99 = pct(r.chain_ms, 50), pct(r.chain_ms, 99)
        r50, r99 = o50 / c50, o99 / c99
        print(f"{r.symbols:>7} | {o50:8.2f} {o99:8.2f} | {s50:8.2f} {s99:8.2f} | "
              f"{c50:8.2f} {c99:8.2f} | {r50:7.2f}x  {verdict(r50, P50_GOAL):<4}       | "
              f"{r99:7.2f}x  {verdict(r99, P99_GOAL):<4}")
    print()
    for r in results:
        s50, s99 = pct(r.tick_settled_ms, 50), pct(r.tick_settled_ms, 99)
        c50, c99 = pct(r.chain_ms, 50), pct(r.chain_ms, 99)
        note = "" if len(r.tick_order_ms) >= 100 else "  (fewer than 100: p99 is rough)"
        first = r.last_bar - r.measured_bars + 1
        print(f"{r.symbols} symbols: {r.measured_bars} bars measured (bars {first}-{r.last_bar}"
              f" of the day), {r.bars_with_orders} with "
              f"orders{note}; {r.orders} orders ({r.entries} entries, {r.exits} exits), "
              f"{r.rejected} rejected; {len(r.chain_ms)} bare chains; "
              f"tick->settled / chain: p50 {s50 / c50:.2f}x, p99 {s99 / c99:.2f}x")
        for e in r.errors:
            print(f"  ERROR: {e}")


def _raise_interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--symbols", type=int, nargs="+", default=[100, 500])
    p.add_argument("--bars", type=int, default=200,
                   help="bars of the day to tick through, warm-up included (default 200)")
    p.add_argument("--min-order-bars", type=int, default=100,
                   help="keep ticking past --bars until this many measured bars had orders "
                        "(p99 needs >= 100 samples; default 100)")
    p.add_argument("--warmup", type=int, default=20, help="bars / chains not measured")
    p.add_argument("--chains", type=int, default=200, help="bare chains measured")
    p.add_argument("--keep-logs", action="store_true", help="keep the workers' logs")
    args = p.parse_args(argv)

    os.chdir(REPO)
    sys.path.insert(0, str(REPO))
    # SIGTERM -> KeyboardInterrupt, so the finally blocks stop the cluster and Redis.
    signal.signal(signal.SIGTERM, _raise_interrupt)

    from core.cluster import PrivateRedis

    log_root = Path(tempfile.mkdtemp(prefix="dt-bench-logs-"))
    server = None
    results: list[Result] = []
    keep_logs = args.keep_logs
    load0 = os.getloadavg()[0]
    try:
        server = PrivateRedis.start()
        # celeryconfig reads the settings at import: point them at the private server first.
        os.environ["TRADING_REDIS_URL"] = server.url
        os.environ["TRADING_MODE"] = "sim"
        from tasks.app import app

        print(f"private Redis at {server.url}; worker logs in {log_root}; "
              f"load average {load0:.2f} on {os.cpu_count()} CPUs", file=sys.stderr)
        for n in args.symbols:
            results.append(run_config(app, server.url, n, args, log_root))
            server_client = __import__("redis").Redis.from_url(server.url)
            server_client.flushdb()  # next size starts from an empty database and queues
            server_client.close()
        print_table(results)
        if load0 > 0.7:
            print(f"note: load average was {load0:.2f} before the benchmark started; other "
                  "work on this machine makes the numbers noisy")
    except KeyboardInterrupt:
        keep_logs = True
        print(f"\ninterrupted (logs in {log_root})", file=sys.stderr)
        if results:
            print_table(results)
    except Exception as exc:  # a benchmark reports and exits 0
        keep_logs = True
        print(f"benchmark failed: {type(exc).__name__}: {exc} (logs in {log_root})",
              file=sys.stderr)
        if results:
            print_table(results)
        return 0
    finally:
        if server is not None:
            server.stop()
        if not keep_logs and not any(r.errors for r in results):
            shutil.rmtree(log_root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
