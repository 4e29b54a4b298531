"""Tick latency through the real queues versus a bare Celery chain of the same shape.

Usage::

    .venv/bin/python bench/tick_latency.py [--symbols 100 500] [--bars 200] [--warmup 20]
                                           [--chains 200] [--min-order-bars 100]
                                           [--poll-ms 0.5] [--no-interleave] [--keep-logs]

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
    latency = date_done of that result - t0. One chain runs after each settled bar (so both
    paths see the same machine conditions), then more until ``--chains`` are measured.

The first ``--warmup`` bars/chains are not measured. ORB gives orders on some bars only, so
the tick path runs past ``--bars`` until ``--min-order-bars`` measured bars had orders (p99
needs >= 100 samples; with 100 symbols that takes ~300 bars). The replay's settings make
orders flow all day: a $100M daily limit, 100000 open positions, 0.001 % risk per trade.

Prints a table with p50/p99 and the ratios against the goals (p50 <= 1.5x, p99 <= 2.0x the
bare chain), plus each task's run time as the workers log it and the CPU that other
processes used meanwhile (this 2-core machine is often shared; above ~0.15 cores the numbers
are noisy). Always exits 0: it is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
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
POLL_S = 0.0005  # sleep between polls of Redis (busy-poll at most every 0.5 ms); --poll-ms
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
    task_ms: dict[str, list[float]] = field(default_factory=dict)
    foreign: tuple[float, float] = (float("nan"), float("nan"))


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
        "TRADING_DAILY_LOSS_LIMIT": "100000000",
        "TRADING_SIM_STARTING_CASH": "1000000000",
        # Size = limit x risk / stop: 0.00001 of $100M with a 1 % stop is ~$100k a position,
        # so the daily limit never runs out (the default 0.002 would stop entries after 5).
        "TRADING_RISK_PCT_PER_TRADE": "0.00001",
        # A slow bar must never be re-dispatched by the tick: that would add orders twice.
        "TRADING_SIM_SETTLE_TIMEOUT_S": "3600",
    })
    return env


class CpuMeter:
    """CPU used on the machine by processes other than this benchmark's (cores, averaged).

    This machine has 2 cores and is often shared: a foreign load of a few tenths of a core
    moves the latencies a lot, so each phase reports it next to its numbers.
    """

    def __init__(self, pids: list[int]) -> None:
        try:
            import psutil
        except ImportError:  # pragma: no cover - psutil comes with the venv (celery deps)
            self.psutil = None
            return
        self.psutil = psutil
        self.procs = []
        for pid in pids:
            try:
                proc = psutil.Process(pid)
                self.procs += [proc, *proc.children(recursive=True)]
            except psutil.Error:
                pass
        self.start = self._snap()

    def _snap(self) -> tuple[float, float, float, float]:
        ps = self.psutil
        m = ps.cpu_times()
        busy = m.user + m.nice + m.system  # process time only (not irq, softirq, steal)
        steal = getattr(m, "steal", 0.0)
        ours = 0.0
        for proc in self.procs:
            try:
                t = proc.cpu_times()
                ours += t.user + t.system
            except ps.Error:
                pass
        return time.monotonic(), busy, ours, steal

    def foreign_cores(self) -> tuple[float, float]:
        """Average cores used by other processes, and stolen by the hypervisor, since the
        meter was made (nan if unknown)."""
        if self.psutil is None:
            return float("nan"), float("nan")
        t1, b1, o1, s1 = self._snap()
        t0, b0, o0, s0 = self.start
        wall = max(t1 - t0, 1e-9)
        return max(0.0, (b1 - b0) - (o1 - o0)) / wall, max(0.0, s1 - s0) / wall


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
                  min_order_bars: int, tick_options: dict, after_bar=None) -> None:
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
        if after_bar is not None and not after_bar():
            return
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


class BareChains:
    """The baseline: chains exec -> gpu -> exec -> exec of the empty ``tasks.ping``."""

    def __init__(self, app, rt, cluster, res: Result, warmup: int) -> None:
        from celery import chain

        self.app, self.chain, self.r = app, chain, rt.redis
        self.cluster, self.res, self.warmup = cluster, res, warmup
        self.sent = 0

    def _ping(self, queue: str, *args: object, **options: object):
        # Immutable (.si): a step does not receive its parent's result.
        return self.app.signature("tasks.ping", args=args, immutable=True).set(
            queue=queue, **options)

    def one(self) -> bool:
        """Run one chain to its end; False (with an error recorded) if it failed."""
        i = self.sent
        self.sent += 1
        c = self.chain(self._ping("exec"), self._ping("gpu"), self._ping("exec"),
                       self._ping("exec", {"seq": i}, ignore_result=False))
        t0 = time.time()
        result = c.apply_async()
        key = f"celery-task-meta-{result.id}"
        deadline = time.monotonic() + BAR_TIMEOUT_S
        while True:
            raw = self.r.get(key)
            if raw is not None:
                break
            if time.monotonic() > deadline:
                self.res.errors.append(f"bare chain {i} did not finish in {BAR_TIMEOUT_S:.0f} s"
                                       f" (dead: {self.cluster.dead()})")
                return False
            time.sleep(POLL_S)
        meta = json.loads(raw)
        if meta.get("status") != "SUCCESS" or meta.get("result") != {"seq": i}:
            self.res.errors.append(f"bare chain {i}: unexpected result {meta}")
            return False
        done = dt.datetime.fromisoformat(meta["date_done"])
        if done.tzinfo is None:
            done = done.replace(tzinfo=dt.UTC)
        self.r.delete(key)
        if i >= self.warmup:
            self.res.chain_ms.append((done.timestamp() - t0) * 1000.0)
        return True


def run_config(app, redis_url: str, n_symbols: int, args, log_root: Path,
               redis_pid: int) -> Result:
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
        ours = [os.getpid(), redis_pid, *(p.pid for p in cluster.procs.values())]
        chains = BareChains(app, rt, cluster, res, args.warmup)
        meter = CpuMeter(ours)
        t = time.perf_counter()
        # One bare chain after each settled bar: both paths see the same machine conditions
        # (this VM's speed drifts by tens of percent from minute to minute).
        run_tick_path(app, rt, settings, cluster, res, args.bars, args.warmup,
                      args.min_order_bars, tick_options,
                      after_bar=chains.one if args.interleave else None)
        print(f"[{n_symbols} symbols] tick path: {res.measured_bars} bars measured in "
              f"{time.perf_counter() - t:.1f} s", file=sys.stderr)
        t = time.perf_counter()
        while len(res.chain_ms) < args.chains and not res.errors:
            chains.one()
        res.foreign = meter.foreign_cores()
        print(f"[{n_symbols} symbols] bare chain: {len(res.chain_ms)} chains "
              f"({'interleaved with the ticks, then ' if args.interleave else ''}"
              f"{time.perf_counter() - t:.1f} s after the tick path)", file=sys.stderr)
    finally:
        cluster.stop()
        rt.redis.close()
    res.task_ms = task_times(cluster.log_dir)
    return res


_SUCCEEDED = re.compile(r"Task (tasks\.\w+)\[[^\]]+\] succeeded in ([0-9.eE+-]+)s")


def task_times(log_dir: Path) -> dict[str, list[float]]:
    """Run time of each task as the workers log it ('succeeded in'), in ms, by task name."""
    out: dict[str, list[float]] = {}
    for log in sorted(log_dir.glob("*.log")):
        for line in log.read_text(errors="replace").splitlines():
            m = _SUCCEEDED.search(line)
            if m:
                out.setdefault(m.group(1), []).append(float(m.group(2)) * 1000.0)
    return out


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
        foreign, steal = r.foreign
        print(f"  meanwhile other processes used {foreign:.2f} cores, hypervisor steal "
              f"{steal:.2f} cores"
              + ("  <- NOISY: rerun on a quiet machine" if max(foreign, steal) > 0.15 else ""))
        if r.task_ms:
            parts = [f"{name.removeprefix('tasks.')} {pct(v, 50):.1f}/{pct(v, 99):.1f}"
                     for name, v in sorted(r.task_ms.items())]
            print("  run time inside the workers, p50/p99 ms (warm-up included): "
                  + ", ".join(parts))
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
    p.add_argument("--no-interleave", dest="interleave", action="store_false",
                   help="run all bare chains after the tick path instead of one after each bar")
    p.add_argument("--poll-ms", type=float, default=0.5,
                   help="sleep between polls of Redis in ms (default 0.5); the latencies use "
                        "the workers' own time stamps, so this only changes the load")
    p.add_argument("--keep-logs", action="store_true", help="keep the workers' logs")
    args = p.parse_args(argv)
    global POLL_S
    POLL_S = args.poll_ms / 1000.0

    os.chdir(REPO)
    sys.path.insert(0, str(REPO))
    # SIGTERM -> KeyboardInterrupt, so the finally blocks stop the cluster and Redis.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored

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
            results.append(run_config(app, server.url, n, args, log_root, server.proc.pid))
            server_client = __import__("redis").Redis.from_url(server.url)
            server_client.flushdb()  # next size starts from an empty database and queues
            server_client.close()
        print_table(results)
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
