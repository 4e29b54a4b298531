"""The ``daytrader`` command line.

``daytrader sim`` starts the real cluster (Redis if none answers, a gpu worker, an exec
worker, beat, optionally Flower) as processes over a replayed or synthetic run, shows a
progress line, stops what it started and writes ``summary.json`` and ``trades.csv``.
``daytrader backtest`` runs the same steps inline in one process over bar files and writes
the same outputs. ``daytrader train`` trains the entry and exit models walk-forward over bar
files, writes a model version (with ``metrics.json``) and promotes it when it beats the
current one.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import secrets
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from core.errors import ConfigError, TradingError

log = logging.getLogger("daytrader")


def _date(value: str) -> dt.date:
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {value!r}") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="daytrader", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("sim", help="run the simulated cluster over replayed or synthetic days")
    src = sim.add_mutually_exclusive_group()
    src.add_argument("--data", type=Path, help="folder of bar files (SYMBOL_1min.csv.gz)")
    src.add_argument("--synthetic", action="store_true", help="generate seeded synthetic days")
    sim.add_argument("--days", type=int, help="number of sessions to replay (default 1)")
    sim.add_argument("--speed", type=float,
                     help="simulated minutes per wall minute (60 = one bar per second)")
    sim.add_argument("--from", dest="from_", type=_date, help="first session date")
    sim.add_argument("--to", type=_date, help="last session date")
    sim.add_argument("--symbols", help="comma-separated symbols (default: all in --data)")
    sim.add_argument("--synthetic-symbols", type=int, help="universe size of a synthetic run")
    sim.add_argument("--seed", type=int, help="seed of the synthetic generator")
    sim.add_argument("--out", type=Path, required=True, help="folder for summary.json etc.")
    sim.add_argument("--flower", action="store_true", help="also run Flower on 127.0.0.1")
    sim.add_argument("--stall-timeout", type=float, default=120.0,
                     help="give up when the replay makes no progress for this many seconds")
    sim.add_argument("--quiet", action="store_true", help="no progress line")

    bt = sub.add_parser("backtest", help="run the cluster's decision path over bar files in "
                                          "one process")
    bt.add_argument("--data", type=Path, required=True,
                    help="folder of bar files (SYMBOL_1min.csv.gz or SYMBOL_5min.csv.gz)")
    bt.add_argument("--from", dest="from_", type=_date, help="first session date")
    bt.add_argument("--to", type=_date, help="last session date")
    bt.add_argument("--days", type=int, help="at most this many sessions")
    bt.add_argument("--symbols", help="comma-separated symbols (default: all in --data)")
    models = bt.add_mutually_exclusive_group()
    models.add_argument("--model-dir", type=Path,
                        help="model registry to score with (default TRADING_MODEL_DIR)")
    models.add_argument("--no-ml", action="store_true", help="rules only, no model")
    bt.add_argument("--out", type=Path, required=True, help="folder for summary.json etc.")
    bt.add_argument("--quiet", action="store_true", help="no progress bar")

    st = sub.add_parser("status", help="account, positions, P/L, capital, halts, last tick, "
                                      "model, queues of a running cluster")
    st.add_argument("--run", help="simulated run id (default: the most recently active one)")
    st.add_argument("--json", action="store_true", help="print the status as JSON")
    met = sub.add_parser("metrics", help="serve the status as Prometheus metrics")
    met.add_argument("--run", help="simulated run id (default: the most recently active one)")
    met.add_argument("--address", default="127.0.0.1", help="bind address (default loopback)")
    met.add_argument("--port", type=int, default=9108, help="port (default 9108)")

    from core.market.fetch import add_fetch_parser

    add_fetch_parser(sub)
    sub.add_parser("feed", help="run the market-data feed (paper/live): backfill, then stream")

    train = sub.add_parser("train", help="train the entry/exit models walk-forward over bar files")
    train.add_argument("--data", type=Path, required=True,
                       help="folder of bar files (SYMBOL_1min.csv.gz)")
    train.add_argument("--model-dir", type=Path,
                       help="model registry folder (default TRADING_MODEL_DIR)")
    train.add_argument("--from", dest="from_", type=_date, help="first session date")
    train.add_argument("--to", type=_date, help="last session date")
    train.add_argument("--symbols", nargs="+",
                       help="symbols, comma- or space-separated (default: all in --data)")
    train.add_argument("--folds", type=int, default=5, help="walk-forward folds (default 5)")
    train.add_argument("--purge-days", type=int, default=1,
                       help="sessions dropped between training and validation (default 1)")
    train.add_argument("--promote", action=argparse.BooleanOptionalAction, default=True,
                       help="make the new version current if it beats the current one "
                            "(default: --promote)")
    train.add_argument("--rows", choices=("signals", "all"), default="signals",
                       help="entry rows: rule signals only, or also every k-th bar")
    train.add_argument("--entry-threshold", type=float,
                       help="entry decision probability (default: break-even of the barriers)")
    train.add_argument("--seed", type=int, default=7, help="XGBoost seed")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _range_env(args: argparse.Namespace) -> dict[str, str]:
    """The replay's date range and symbols from ``--from``, ``--to`` and ``--symbols``."""
    env: dict[str, str] = {}
    if args.from_ is not None:
        env["TRADING_SIM_FROM"] = args.from_.isoformat()
    if args.to is not None:
        env["TRADING_SIM_TO"] = args.to.isoformat()
    if args.symbols:
        env["TRADING_SIM_SYMBOLS"] = args.symbols
    return env


def _sim_env(args: argparse.Namespace) -> dict[str, str]:
    env: dict[str, str] = {"TRADING_MODE": "sim"}
    if args.data is not None:
        env["TRADING_SIM_DATA"] = str(args.data.resolve())
    if args.days is not None:
        env["TRADING_SIM_DAYS"] = str(args.days)
    if args.speed is not None:
        env["TRADING_SIM_SPEED"] = repr(args.speed)
    env.update(_range_env(args))
    if args.synthetic_symbols is not None:
        env["TRADING_SIM_SYNTHETIC_SYMBOLS"] = str(args.synthetic_symbols)
    if args.seed is not None:
        env["TRADING_SIM_SEED"] = str(args.seed)
    return env


def run_sim(args: argparse.Namespace) -> int:
    """Run a simulated cluster to the end of its days and write the outputs."""
    from core.cluster import Cluster, ensure_redis
    from core.config import load_settings
    from core.report import summarize, write_outputs
    from core.runtime import build_runtime
    from core.sim import load_sim_days, prepare_replay

    os.environ.update(_sim_env(args))
    if args.synthetic:
        os.environ.pop("TRADING_SIM_DATA", None)
    settings = load_settings()
    days = load_sim_days(settings)
    url, private = ensure_redis(settings.redis_url)
    run_id = f"{dt.datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
    os.environ["TRADING_REDIS_URL"] = url
    os.environ["TRADING_SIM_RUN_ID"] = run_id
    settings = load_settings()
    out: Path = args.out
    cluster = Cluster(env=dict(os.environ), log_dir=out / "logs")
    try:
        _refuse_if_busy(url)
        rt = build_runtime(settings)
        prepare_replay(rt, settings, days)
        print(f"daytrader sim: run {run_id}, {len(days)} day(s), {len(days[0].symbols)} "
              f"symbols, {settings.sim_speed:g}x, Redis {url}", file=sys.stderr)
        cluster.start_workers(tag=run_id[-6:])
        cluster.start_beat()
        if args.flower:
            user = settings.flower_user or "admin"
            password = (settings.flower_password.get_secret_value()
                        if settings.flower_password else secrets.token_urlsafe(12))
            cluster.start_flower(settings.flower_port, user, password)
            # a password the user set is never printed; a generated one must be, once
            shown = "(TRADING_FLOWER_PASSWORD)" if settings.flower_password else password
            print(f"Flower: http://127.0.0.1:{settings.flower_port}  user {user}  "
                  f"password {shown}", file=sys.stderr)
        try:
            ok = _wait(rt, cluster, args.stall_timeout, quiet=args.quiet)
        except KeyboardInterrupt:
            print("\ninterrupted: stopping the cluster and writing what ran so far",
                  file=sys.stderr)
            ok = False
        cluster.stop("beat")
        _drain(rt)
        cluster.stop()
        summary = summarize(
            rt.broker.trades(), rt.replay.day_stats(), rt.broker.order_log(),
            settings.daily_limit_cents,
            extra={"mode": "sim", "run_id": run_id, "completed": ok,
                   "source": str(settings.sim_data) if settings.sim_data else "synthetic",
                   "symbols": len(days[0].symbols), "speed": settings.sim_speed})
        write_outputs(out, summary, rt.broker.trades())
        _print_summary(summary, out)
        return 0 if ok else 1
    finally:
        cluster.stop()
        if private is not None:
            private.stop()


def run_backtest_cmd(args: argparse.Namespace) -> int:
    """Backtest bar files through the cluster's own steps and write the outputs."""
    from core.backtest import progress_line
    from core.config import load_settings
    from core.report import summarize, write_outputs
    from core.sim import load_sim_days

    if args.from_ and args.to and args.from_ > args.to:
        raise ConfigError(f"--from {args.from_} is after --to {args.to}")
    if args.days is not None and args.days < 1:
        raise ConfigError("--days must be at least 1")
    if not args.data.is_dir():
        raise ConfigError(f"--data {args.data}: no such folder")
    env = {"TRADING_MODE": "sim", "TRADING_SIM_DATA": str(args.data.resolve()),
           "TRADING_SIM_DAYS": str(args.days or 3650)}
    env.update(_range_env(args))
    if args.model_dir is not None:
        env["TRADING_MODEL_DIR"] = str(args.model_dir.resolve())
    os.environ.update(env)
    settings = load_settings()
    # the report's plotting library loads while other processes parse the bar files
    days = load_sim_days(settings, meanwhile=_import_plotting)
    _print_coverage(days)
    # the backtest runs in this process on an in-memory stand-in for Redis: no server
    run_id = f"bt-{dt.datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
    settings = settings.model_copy(update={"sim_run_id": run_id})
    print(f"daytrader backtest: {len(days)} day(s) {days[0].date}..{days[-1].date}, "
          f"{len(days[0].symbols)} symbols, {days[0].bar_seconds // 60}-minute bars, "
          f"{'rules only' if args.no_ml else f'models from {settings.model_dir}'}",
          file=sys.stderr)
    # the baselines (same sizing and exits: without the model, and random entries) run in
    # a forked process beside the main pass when there are two cores
    global _FORK_DAYS
    _FORK_DAYS = days
    from core.backtest import run_backtest
    from core.forking import fork_pool

    with fork_pool(1) as pool:
        # the worker forks at the first submit, before this process loads a model
        pending = {"random entries": pool.submit(_baseline_pass, settings.model_copy(
            update={"sim_run_id": run_id + "-random", "strategies": ("random",)}))}
        rt, used_model = _backtest_runtime(settings, args.no_ml)
        if used_model:  # without a model the main run is the rules-only one
            pending = {"rules only": pool.submit(_baseline_pass, settings.model_copy(
                update={"sim_run_id": run_id + "-rules"})), **pending}
        main = run_backtest(rt, settings, days, None if args.quiet else progress_line)
        done = {name: f.result() for name, f in pending.items()}
    _FORK_DAYS = None
    summary = summarize(
        main.trades, main.day_stats, main.order_log, settings.daily_limit_cents,
        extra={"mode": "backtest", "run_id": run_id, "completed": True,
               "source": str(settings.sim_data), "symbols": len(days[0].symbols),
               "bar_seconds": days[0].bar_seconds, "model_version": used_model,
               "symbol_bars": main.symbol_bars, "seconds": round(main.seconds, 3)})
    runs = {"strategy" + (f" + model {used_model}" if used_model else ""): main, **done}
    summary["stats"] = _stats(main, settings)
    summary["baselines"] = {name: _stats(run, settings)
                            for name, run in list(runs.items())[1:]}
    write_outputs(args.out, summary, main.trades)
    _write_report(args.out, runs, settings)
    _print_summary(summary, args.out)
    return 0


def _import_plotting() -> None:
    """Import what the report draws with (matplotlib's Agg figures)."""
    import matplotlib.backends.backend_agg
    import matplotlib.figure  # noqa: F401


_FORK_DAYS: list[Any] | None = None  # the loaded days, inherited by forked baseline passes


def _baseline_pass(settings: Any) -> Any:
    """A rules-only pass over the loaded days (run in a forked worker, or inline)."""
    from core.backtest import run_backtest

    if _FORK_DAYS is None:
        raise RuntimeError("no days loaded for the baseline pass")
    return run_backtest(_backtest_runtime(settings, True)[0], settings, _FORK_DAYS)


def _print_coverage(days: list[Any]) -> None:
    """Name the symbols that have no bar at all on some of the sessions (not traded then)."""
    import numpy as np

    for j, sym in enumerate(days[0].symbols if days else ()):
        missing = [d.date.isoformat() for d in days if np.isnan(d.ohlcv[:, j, 3]).all()]
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            print(f"note: {sym} has no bars on {len(missing)} of {len(days)} sessions "
                  f"({', '.join(missing[:5])}{more}): not traded then", file=sys.stderr)


def _backtest_runtime(settings: Any, no_ml: bool) -> tuple[Any, str | None]:
    """An in-memory runtime for one backtest pass and the model version it will use (None:
    rules only); a configured model that cannot be used stops the backtest."""
    from core.runtime import build_memory_runtime

    rt = build_memory_runtime(settings)
    if no_ml:
        rt.models = None
    used = None
    if rt.models is not None:
        predictor = rt.models.get()
        if rt.models.problem:
            raise ConfigError(f"cannot backtest with the model: {rt.models.problem}")
        used = predictor.version if predictor is not None else None
    return rt, used


def _stats(run: Any, settings: Any) -> dict[str, Any]:
    from core.analytics import RunResult, stats

    return stats(RunResult(run.trades, run.day_stats, settings.daily_limit_cents),
                 int(settings.sim_starting_cash * 100))


def _write_report(out: Path, runs: dict[str, Any], settings: Any) -> None:
    from core.analytics import RunResult
    from core.report_html import write_report

    write_report(out, {name: RunResult(r.trades, r.day_stats, settings.daily_limit_cents)
                       for name, r in runs.items()}, int(settings.sim_starting_cash * 100))


def _drop_namespace(rt: Any) -> None:
    """Remove a finished run's keys from Redis (its outputs are on disk)."""
    from core.runtime import drop_namespace

    drop_namespace(rt.redis, rt.keys.k(""))


def _status_runtime(run: str | None) -> Any:
    """A runtime on the cluster's Redis; in sim mode on the chosen (or latest) run."""
    from core.config import load_settings
    from core.runtime import build_runtime, connect_redis
    from core.status import latest_sim_run

    settings = load_settings()
    if settings.mode == "sim":
        run = run or latest_sim_run(connect_redis(settings.redis_url))
        if run is None:
            raise ConfigError(f"no simulated run found in {settings.redis_url}")
        settings = settings.model_copy(update={"sim_run_id": run})
    return build_runtime(settings)


def run_status(args: argparse.Namespace) -> int:
    """Print the status of a running (or finished) cluster."""
    from core.status import collect, render_text

    doc = collect(_status_runtime(args.run))
    print(json.dumps(doc, indent=2) if args.json else render_text(doc))
    return 0


def run_metrics(args: argparse.Namespace) -> int:
    """Serve ``/metrics`` (Prometheus text) until interrupted."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from core.status import collect, render_prometheus

    rt = _status_runtime(args.run)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?")[0] != "/metrics":
                self.send_error(404)
                return
            body = render_prometheus(collect(rt)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: Any) -> None:
            return

    server = ThreadingHTTPServer((args.address, args.port), Handler)
    print(f"metrics on http://{args.address}:{server.server_port}/metrics", file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def _train_symbols(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    out = [p.strip().upper() for v in values for p in v.split(",") if p.strip()]
    if not out:
        raise ConfigError("--symbols names no symbol")
    return list(dict.fromkeys(out))


def run_train(args: argparse.Namespace) -> int:
    """Train walk-forward, write a model version, print the per-fold table, maybe promote."""
    from core.config import load_settings
    from ml.train import train_from_files

    settings = load_settings()
    model_dir: Path = args.model_dir or settings.model_dir
    symbols = _train_symbols(args.symbols)
    print(f"daytrader train: {args.data} -> {model_dir}, {args.folds} fold(s), "
          f"purge {args.purge_days} day(s)", file=sys.stderr)
    run = train_from_files(args.data, model_dir, settings, symbols, args.from_, args.to,
                           folds=args.folds, purge_days=args.purge_days, rows=args.rows,
                           entry_threshold=args.entry_threshold, seed=args.seed,
                           progress=not args.quiet, promote_new=args.promote)
    print(run.table)
    print(f"written: {model_dir / run.version}")
    if run.promoted is None:
        print(run.reason)
    else:
        print(f"{'promoted to current' if run.promoted else 'not promoted'}: {run.reason}")
    return 0


def _refuse_if_busy(url: str) -> None:
    """Refuse to start a second cluster on a broker where workers already listen.

    Asks through the ``celery`` command (core never imports Celery itself).
    """
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as empty:
        proc = subprocess.run(
            [sys.executable, "-m", "celery", "-b", url, "inspect", "ping", "--timeout", "0.5"],
            cwd=empty, capture_output=True, text=True, timeout=60,
            env={k: v for k, v in os.environ.items() if not k.startswith("CELERY_")})
    if proc.returncode == 0 and "pong" in proc.stdout:
        raise ConfigError(f"workers already consume from {url}; stop them or point "
                          "TRADING_REDIS_URL at another database")


def _wait(rt: Any, cluster: Any, stall_timeout: float, quiet: bool,
          max_restarts: int = 5) -> bool:
    """Follow the replay to its end, restarting crashed processes like a supervisor."""
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    last, last_change = None, time.monotonic()
    while True:
        try:
            st = rt.replay.state()
        except (RedisConnectionError, RedisTimeoutError):
            if time.monotonic() - last_change > stall_timeout:
                print(f"\nRedis unreachable for {stall_timeout:.0f} s", file=sys.stderr)
                return False
            time.sleep(0.5)  # Redis restarting: the workers reconnect, so do we
            continue
        if st.finished:
            if not quiet:
                print(file=sys.stderr)
            return True
        key = (st.day, st.bar, st.settled)
        if key != last:
            last, last_change = key, time.monotonic()
        elif time.monotonic() - last_change > stall_timeout:
            print(f"\nno progress for {stall_timeout:.0f} s at day {st.day} bar {st.bar}; "
                  f"see {cluster.log_dir}", file=sys.stderr)
            return False
        for name in cluster.dead():
            if cluster.restarts >= max_restarts:
                print(f"\n{name} keeps exiting ({cluster.restarts} restarts); "
                      f"see {cluster.log_dir}", file=sys.stderr)
                return False
            print(f"\n{name} exited; restarting it (see {cluster.log_dir})", file=sys.stderr)
            cluster.restart(name)
        if not quiet and st.date is not None:
            days = rt.replay.days()
            n = days[st.day].n_bars
            trades = rt.redis.llen(rt.keys.broker("trades"))
            open_pos = rt.redis.hlen(rt.keys.broker("positions"))
            print(f"\r{st.date} day {st.day + 1}/{len(days)}  bar {st.bar + 1:>3}/{n}  "
                  f"trades {trades}  open {open_pos}   ", end="", file=sys.stderr, flush=True)
        time.sleep(0.25)


def _drain(rt: Any, timeout: float = 10.0) -> None:
    """Wait briefly for queued tasks (late EOD checks) before stopping the workers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(rt.redis.llen(q) for q in ("exec", "gpu")):
            return
        time.sleep(0.1)


def _print_summary(summary: dict[str, Any], out: Path) -> None:
    keys = ("days", "trades", "net_pnl", "gross_pnl", "fees", "win_rate",
            "max_daily_used_capital", "daily_limit", "open_positions_at_close",
            "duplicate_client_order_ids")
    print("summary:", file=sys.stderr)
    for k in keys:
        print(f"  {k:<28} {summary[k]}", file=sys.stderr)
    print(f"written: {out / 'summary.json'}, {out / 'trades.csv'}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``daytrader`` console script."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        from core.config import load_settings
        from core.logs import StructuredFormatter, secret_values

        for handler in logging.getLogger().handlers:  # secrets masked here too
            handler.setFormatter(StructuredFormatter(
                secret_values(load_settings()), fmt="%(levelname)s %(name)s: %(message)s"))
    except Exception:  # bad settings are reported by the command itself
        pass
    args = _parser().parse_args(argv)
    try:
        if args.command == "sim":
            return run_sim(args)
        if args.command == "train":
            return run_train(args)
        if args.command == "backtest":
            return run_backtest_cmd(args)
        if args.command == "status":
            return run_status(args)
        if args.command == "fetch-bars":
            from core.market.fetch import run_fetch

            return run_fetch(args)
        if args.command == "feed":
            from core.market.feed import main_feed

            return main_feed()
        if args.command == "metrics":
            return run_metrics(args)
    except (ConfigError, TradingError) as exc:
        print(f"daytrader: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
