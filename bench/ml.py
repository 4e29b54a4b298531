"""ML on the CPU and on the GPU, side by side: features, XGBoost inference, XGBoost training.

Usage::

    .venv/bin/python bench/ml.py [--symbols 100 1000 5000] [--rows 100 1000 10000]
                                 [--train-rows 200000] [--rounds 200] [--budget-s 2]
                                 [--train-budget-s 8] [--seed 7]

One process, the same data for both devices:

1. features: ``ml.features.entry_features`` (last bar) and ``entry_features_all`` (every bar)
   on numpy and on cupy, for one synthetic day of 390 one-minute bars
   (``core.market.synthetic.generate_days``) laid out field-major as the cluster's bar window.
   The window is copied to the device once (not timed); each cupy run ends with a device
   synchronize inside the timed region. The two results are compared with
   ``np.allclose(equal_nan=True, rtol=1e-9, atol=1e-12)``.
2. inference: a booster of ``len(ENTRY_MODEL_FEATURES)`` features (``max_depth`` 6,
   ``--rounds`` rounds) trained once on random rows, timed with ``inplace_predict`` on the CPU
   (all cores) and on the GPU (input already a cupy array), and through the project's
   ``ml.predictor.XGBoostPredictor`` loaded from a version saved with
   ``ml.registry.save_version`` in a temporary folder (1 thread on the CPU, as in the workers;
   numpy out, so the GPU path includes the copy back).
3. training: ``xgb.train`` with ``tree_method="hist"`` on ``--train-rows`` random rows, device
   cpu and cuda, on the same DMatrix (built once, not timed).

Each case runs once to warm up, then until ``--budget-s`` (``--train-budget-s`` for training)
seconds have passed, with at least 3 runs (1 when the warm-up alone took over 3x the
budget); the tables show the best and the median run. A GPU column is skipped, with the
reason, when ``ml.device.cuda_available()`` is False or cupy is missing. Measures only: no
Redis, nothing written outside a temp folder.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import xgboost as xgb

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # runnable as `.venv/bin/python bench/ml.py`
    sys.path.insert(0, str(REPO))

from core.market.synthetic import generate_days  # noqa: E402
from ml.dataset import ENTRY_MODEL_FEATURES, EXIT_MODEL_FEATURES  # noqa: E402
from ml.device import cuda_available  # noqa: E402
from ml.features import entry_features, entry_features_all  # noqa: E402
from ml.predictor import XGBoostPredictor  # noqa: E402
from ml.registry import save_version  # noqa: E402

DAY = dt.date(2025, 11, 24)
BAR_SECONDS = 60
MAX_RUNS = 50
BOOSTER_PARAMS = {"tree_method": "hist", "max_depth": 6, "objective": "binary:logistic"}

Timing = tuple[float, float, int] | None  # best ms, median ms, runs; None when skipped


def field_major(ohlcv: Any, xp: ModuleType) -> Any:
    """[T, S, 5] view of a field-major [5, T, S] buffer, as the cluster keeps its window."""
    return xp.ascontiguousarray(ohlcv.transpose(2, 0, 1)).transpose(1, 2, 0)


def no_sync() -> None:
    """Nothing to wait for on the CPU."""


def timed(fn: Callable[[], Any], sync: Callable[[], None], budget_s: float,
          max_runs: int = MAX_RUNS, warmup: Callable[[], Any] | None = None,
          ) -> tuple[tuple[float, float, int], Any]:
    """(best ms, median ms, runs) after one warm-up run, and the last result.

    Runs until ``budget_s`` has passed, at least 3 times unless the warm-up alone took over 3x
    the budget (then once); never more than ``max_runs``.
    """
    t0 = time.perf_counter()
    result = (warmup or fn)()
    sync()
    warm_s = time.perf_counter() - t0
    min_runs = 3 if warmup is not None or warm_s <= 3 * budget_s else 1
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_runs and (len(times) < min_runs
                                     or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        result = fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return (min(times), statistics.median(times), len(times)), result


def cell(t: Timing, width: int = 22) -> str:
    if t is None:
        return f"{'skipped':>{width}}"
    best, median, runs = t
    return f"{f'{best:.2f} / {median:.2f} ({runs})':>{width}}"


def ratio(cpu: Timing, gpu: Timing) -> str:
    if cpu is None or gpu is None:
        return f"{'-':>7}"
    return f"{cpu[1] / gpu[1]:>6.1f}x"


def failed(exc: BaseException) -> str:
    """A skip reason for a GPU run that raised (the bench goes on without the GPU)."""
    text = str(exc).strip()
    return f"failed: {type(exc).__name__}" + (f": {text.splitlines()[0][:120]}" if text else "")


def gpu_status() -> tuple[ModuleType | None, str | None, str | None]:
    """(cupy or None, why cupy cannot run, why XGBoost cannot use the GPU); None = usable."""
    xgb_reason = None
    if not cuda_available():
        built = bool(xgb.build_info().get("USE_CUDA"))
        xgb_reason = ("ml.device.cuda_available() is False: "
                      + ("no GPU listed by the driver or cupy" if built
                         else "xgboost built without CUDA"))
    try:
        import cupy  # type: ignore[import-not-found]
    except Exception as exc:  # any import failure (no wheel, no CUDA library) means no cupy
        return None, f"cupy not importable ({type(exc).__name__}: {exc})", xgb_reason
    try:
        count = int(cupy.cuda.runtime.getDeviceCount())
    except Exception as exc:
        return None, f"cupy imports but no GPU answers ({type(exc).__name__})", xgb_reason
    if count < 1:
        return None, "cupy imports but sees no GPU", xgb_reason
    return cupy, None, xgb_reason


def gpu_name(cupy: ModuleType) -> str:
    name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def bench_features(args: argparse.Namespace, cupy: ModuleType | None,
                   cupy_reason: str | None) -> None:
    print("[1] features at 390 one-minute bars: ms best / median (runs)")
    header = (f"{'function':<19} {'symbols':>7} {'numpy':>22} {'cupy':>22} {'speedup':>7}"
              f"  numpy == cupy")
    print(header)
    print("-" * len(header))
    sync = cupy.cuda.Device().synchronize if cupy is not None else no_sync
    for n_sym in args.symbols:
        ohlcv = generate_days([DAY], n_sym, seed=args.seed)[0].ohlcv
        host = field_major(ohlcv, np)
        device = None
        if cupy is not None:
            try:
                device = field_major(cupy.asarray(ohlcv), cupy)
                sync()
            except Exception as exc:  # any GPU trouble: numpy only from here on
                cupy, cupy_reason = None, failed(exc)
        for name, fn in (("entry_features", entry_features),
                         ("entry_features_all", entry_features_all)):
            cpu_t, cpu_out = timed(functools.partial(fn, host, BAR_SECONDS, np), no_sync,
                                   args.budget_s)
            gpu_t: Timing = None
            check = "n/a (no cupy)"
            if device is not None and cupy is not None:
                try:
                    gpu_t, gpu_out = timed(functools.partial(fn, device, BAR_SECONDS, cupy),
                                           sync, args.budget_s)
                    same = np.allclose(cpu_out, cupy.asnumpy(gpu_out), equal_nan=True,
                                       rtol=1e-9, atol=1e-12)
                    check = f"allclose {'ok' if same else 'MISMATCH'} {tuple(cpu_out.shape)}"
                    del gpu_out
                except Exception as exc:  # any GPU trouble: numpy only from here on
                    cupy, cupy_reason, device, gpu_t = None, failed(exc), None, None
                    check = "n/a (GPU failed)"
            print(f"{name:<19} {n_sym:>7} {cell(cpu_t)} {cell(gpu_t)} {ratio(cpu_t, gpu_t)}"
                  f"  {check}", flush=True)
            del cpu_out
        del device
    if cupy is None:
        print(f"GPU: skipped ({cupy_reason})")
    print()


def random_rows(rng: np.random.Generator, n: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 rows [n, width] (2 % NaN, as missing features) and a 0/1 label that depends on
    a few of them."""
    x = rng.standard_normal((n, width)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] * x[:, 2] - 0.3 * np.abs(x[:, 3])
         + rng.standard_normal(n).astype(np.float32) > 0).astype(np.float32)
    x[rng.random((n, width)) < 0.02] = np.nan
    return x, y


def bench_inference(args: argparse.Namespace, cupy: ModuleType | None,
                    cupy_reason: str | None, xgb_reason: str | None) -> None:
    rng = np.random.default_rng(args.seed)
    width = len(ENTRY_MODEL_FEATURES)
    x, y = random_rows(rng, 20_000, width)
    booster = xgb.train(BOOSTER_PARAMS | {"device": "cpu"},
                        xgb.DMatrix(x, label=y, feature_names=list(ENTRY_MODEL_FEATURES)),
                        num_boost_round=args.rounds)
    xe, ye = random_rows(rng, 2_000, len(EXIT_MODEL_FEATURES))
    exit_booster = xgb.train(BOOSTER_PARAMS | {"device": "cpu"},
                             xgb.DMatrix(xe, label=ye, feature_names=list(EXIT_MODEL_FEATURES)),
                             num_boost_round=10)
    gpu_reason = xgb_reason or cupy_reason
    sync = cupy.cuda.Device().synchronize if cupy is not None else no_sync
    print(f"[2] XGBoost inference, {width} features, max_depth 6, {args.rounds} rounds: "
          f"ms best / median (runs)")
    header = (f"{'rows':>6} {'booster cpu':>22} {'booster gpu':>22} {'speedup':>7}"
              f" {'predictor cpu 1 thr':>22} {'predictor gpu':>22}  cpu == gpu")
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory(prefix="bench-ml-") as tmp:
        version = save_version(Path(tmp), booster, exit_booster, {"bench": True}, {})
        pred_cpu = XGBoostPredictor(Path(tmp) / version, device="cpu", nthread=1)
        pred_gpu = None
        if gpu_reason is None:
            try:
                pred_gpu = XGBoostPredictor(Path(tmp) / version, device="cuda")
            except Exception as exc:  # any GPU trouble: CPU only
                gpu_reason = failed(exc)
        for n in args.rows:
            xi, _ = random_rows(rng, n, width)
            booster.set_param({"device": "cpu", "nthread": os.cpu_count() or 1})
            b_cpu, out_cpu = timed(lambda xi=xi: booster.inplace_predict(xi), no_sync,
                                   args.budget_s)
            p_cpu, _ = timed(lambda xi=xi: pred_cpu.predict_entry(xi), no_sync, args.budget_s)
            b_gpu: Timing = None
            p_gpu: Timing = None
            check = "n/a (no GPU)"
            if gpu_reason is None and cupy is not None and pred_gpu is not None:
                try:
                    xd = cupy.asarray(xi)
                    sync()
                    booster.set_param({"device": "cuda"})
                    b_gpu, out_gpu = timed(lambda xd=xd: booster.inplace_predict(xd), sync,
                                           args.budget_s)
                    p_gpu, _ = timed(lambda xd=xd, g=pred_gpu: g.predict_entry(xd), sync,
                                     args.budget_s)
                    diff = float(np.max(np.abs(np.asarray(out_cpu) - cupy.asnumpy(out_gpu))))
                    check = f"max |diff| {diff:.1e} ({'ok' if diff < 1e-5 else 'MISMATCH'})"
                except Exception as exc:  # any GPU trouble: CPU only from here on
                    gpu_reason, b_gpu, p_gpu, check = failed(exc), None, None, "n/a (GPU failed)"
            print(f"{n:>6} {cell(b_cpu)} {cell(b_gpu)} {ratio(b_cpu, b_gpu)} {cell(p_cpu)}"
                  f" {cell(p_gpu)}  {check}", flush=True)
    if gpu_reason is not None:
        print(f"GPU: skipped ({gpu_reason})")
    print()


def bench_training(args: argparse.Namespace, xgb_reason: str | None) -> None:
    rng = np.random.default_rng(args.seed + 1)
    width = len(ENTRY_MODEL_FEATURES)
    x, y = random_rows(rng, args.train_rows, width)
    dtrain = xgb.DMatrix(x, label=y)
    print(f"[3] XGBoost training, {args.train_rows:,} rows x {width} features, hist, max_depth 6,"
          f" {args.rounds} rounds: s best / median (runs)")

    def train(device: str, rounds: int) -> xgb.Booster:
        return xgb.train(BOOSTER_PARAMS | {"device": device}, dtrain, num_boost_round=rounds)

    results: dict[str, Timing] = {}
    for device in ("cpu", "cuda"):
        if device == "cuda" and xgb_reason is not None:
            results[device] = None
            continue
        try:
            t, _ = timed(functools.partial(train, device, args.rounds), no_sync,
                         args.train_budget_s, max_runs=5,
                         warmup=functools.partial(train, device, 5))
        except Exception as exc:  # any GPU trouble: CPU only (a CPU failure is a real error)
            if device == "cpu":
                raise
            results[device], xgb_reason = None, failed(exc)
            continue
        results[device] = (t[0] / 1e3, t[1] / 1e3, t[2])
    cpu, gpu = results["cpu"], results["cuda"]
    print(f"{f'cpu ({os.cpu_count()} threads)':<16}{cell(cpu, 20)}")
    print(f"{'cuda':<16}{cell(gpu, 20)}" if gpu is not None
          else f"GPU: skipped ({xgb_reason})")
    if cpu is not None and gpu is not None:
        print(f"cpu / gpu (median): {cpu[1] / gpu[1]:.1f}x")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--symbols", type=int, nargs="+", default=[100, 1000, 5000])
    ap.add_argument("--rows", type=int, nargs="+", default=[100, 1000, 10_000])
    ap.add_argument("--train-rows", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--budget-s", type=float, default=2.0, help="time per case, about")
    ap.add_argument("--train-budget-s", type=float, default=8.0,
                    help="time per training device, about")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args(argv)

    started = time.perf_counter()
    cupy, cupy_reason, xgb_reason = gpu_status()
    print(f"os.cpu_count()={os.cpu_count()}; xgboost {xgb.__version__}; numpy {np.__version__}"
          f"; cupy {cupy.__version__ if cupy is not None else '-'}")
    if cupy is not None or xgb_reason is None:
        name = gpu_name(cupy) if cupy is not None else "a CUDA GPU"
        print(f"device: {name}; cupy {'usable' if cupy is not None else cupy_reason}; "
              f"xgboost cuda {'usable' if xgb_reason is None else xgb_reason}")
    else:
        print(f"device: cpu only (cupy: {cupy_reason}; xgboost: {xgb_reason})")
    print()
    bench_features(args, cupy, cupy_reason)
    bench_inference(args, cupy, cupy_reason, xgb_reason)
    bench_training(args, xgb_reason)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
