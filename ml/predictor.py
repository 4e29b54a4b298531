"""Serving the trained models: a ``Predictor`` protocol, its XGBoost and TensorRT backends,
and ``ModelHolder``, which follows the registry's ``current`` pointer.

Feature rows are built with ``ml.dataset.entry_model_rows`` / ``exit_model_rows`` (the same
code as training); ``score_signals`` and ``exit_model`` do it for a bar window. A missing or
unloadable model never stops trading: ``ModelHolder.get`` returns None (logged once) and
callers keep to the rule strategies. XGBoost predicts on ``device="cuda"`` when a GPU is
usable, else on the CPU. The TensorRT backend is only tried when ``tensorrt`` is installed
and a GPU is usable, and is imported lazily.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol, runtime_checkable

import numpy as np

from core.signals import Signal
from ml.dataset import (
    ENTRY_MODEL_FEATURES,
    EXIT_MODEL_FEATURES,
    entry_model_rows,
    exit_model_rows,
    strategy_id,
)
from ml.device import cuda_available, resolve_device
from ml.errors import ModelError
from ml.features import entry_features_all, exit_features_all
from ml.registry import CURRENT, ModelVersion, load_version, read_current

log = logging.getLogger(__name__)

ENTRY_PLAN = "entry_model.plan"  # TensorRT engines, built offline next to the .ubj files
EXIT_PLAN = "exit_model.plan"


@runtime_checkable
class Predictor(Protocol):
    """Probabilities from model feature rows: entry (target before stop) and exit (holding on
    loses more than the exit threshold). Inputs [N, F] (numpy or cupy), outputs numpy [N]."""

    version: str

    def predict_entry(self, features: Any) -> np.ndarray:
        """P(target first) per row of ``ENTRY_MODEL_FEATURES`` columns."""
        ...

    def predict_exit(self, features: Any) -> np.ndarray:
        """P(adverse move) per row of ``EXIT_MODEL_FEATURES`` columns."""
        ...


def _to_numpy(x: Any) -> np.ndarray:
    return x.get() if hasattr(x, "get") else np.asarray(x)


def _check_rows(features: Any, names: tuple[str, ...], what: str) -> Any:
    if getattr(features, "ndim", None) != 2 or features.shape[1] != len(names):
        raise ValueError(f"{what} features must be [N, {len(names)}], got shape "
                         f"{getattr(features, 'shape', None)}")
    return features


class XGBoostPredictor:
    """The version folder's XGBoost boosters, on ``device`` (None: cuda if usable, else cpu)
    with ``nthread`` CPU threads (keep 1 inside worker processes)."""

    backend = "xgboost"

    def __init__(self, path: Path, device: str | None = None, nthread: int = 1,
                 loaded: ModelVersion | None = None) -> None:
        mv = loaded or load_version(Path(path))
        self.version = mv.version
        self.path = mv.path
        self.device = resolve_device(device)
        self._cupy: ModuleType | None = None
        if self.device.startswith("cuda") and importlib.util.find_spec("cupy") is not None:
            import cupy

            self._cupy = cupy
        self._entry = mv.entry
        self._exit = mv.exit
        for booster in (self._entry, self._exit):
            booster.set_param({"device": self.device, "nthread": nthread})
        log.info("model %s loaded (xgboost, device %s)", self.version, self.device)

    def _predict(self, booster: Any, features: Any) -> np.ndarray:
        if features.shape[0] == 0:
            return np.zeros(0)
        if self._cupy is not None:
            x = self._cupy.asarray(features, dtype=self._cupy.float32)
        else:
            x = np.asarray(_to_numpy(features), dtype=np.float32)
        return np.asarray(_to_numpy(booster.inplace_predict(x)), dtype=np.float64).reshape(-1)

    def predict_entry(self, features: Any) -> np.ndarray:
        """P(target first) [N] from entry rows [N, len(ENTRY_MODEL_FEATURES)]."""
        return self._predict(self._entry, _check_rows(features, ENTRY_MODEL_FEATURES, "entry"))

    def predict_exit(self, features: Any) -> np.ndarray:
        """P(adverse move) [N] from exit rows [N, len(EXIT_MODEL_FEATURES)]."""
        return self._predict(self._exit, _check_rows(features, EXIT_MODEL_FEATURES, "exit"))


def tensorrt_usable() -> bool:
    """True when the ``tensorrt`` package is installed and a CUDA GPU is usable (no import)."""
    return importlib.util.find_spec("tensorrt") is not None and cuda_available()


class TensorRTPredictor:
    """TensorRT engines built offline from a version's models (``entry_model.plan`` and
    ``exit_model.plan`` in the version folder, e.g. XGBoost -> ONNX -> trtexec), each with one
    float32 input [N, F] and one float32 output [N] or [N, 1] of probabilities. The folder's
    features.json and boosters are checked as for XGBoost, and the engines' probabilities
    must match the boosters' on a probe batch (else ModelError, and "auto" falls back to
    XGBoost). Needs ``tensorrt_usable()``."""

    backend = "tensorrt"

    def __init__(self, path: Path) -> None:
        if not tensorrt_usable():
            raise ModelError("the TensorRT backend needs the tensorrt package and a CUDA GPU")
        mv = load_version(Path(path))
        self.version = mv.version
        self.path = mv.path
        import cupy
        import tensorrt as trt

        self._cp = cupy
        self._trt = trt
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._entry = self._engine(mv.path / ENTRY_PLAN)
        self._exit = self._engine(mv.path / EXIT_PLAN)
        self._check_against(XGBoostPredictor(mv.path, device="cpu", loaded=mv))
        log.info("model %s loaded (tensorrt, checked against XGBoost)", self.version)

    def _check_against(self, ref: XGBoostPredictor, tolerance: float = 1e-3) -> None:
        """Refuse engines whose probabilities differ from the boosters' on a fixed probe
        batch (random rows with missing values) by more than ``tolerance``."""
        rng = np.random.default_rng(20240601)
        for what, names, mine, theirs in (
                ("entry", ENTRY_MODEL_FEATURES, self.predict_entry, ref.predict_entry),
                ("exit", EXIT_MODEL_FEATURES, self.predict_exit, ref.predict_exit)):
            probe = rng.normal(size=(512, len(names)))
            probe[rng.random(probe.shape) < 0.05] = np.nan
            got, want = mine(probe), theirs(probe)
            worst = float(np.max(np.abs(got - want))) if len(want) else 0.0
            if not worst <= tolerance:
                raise ModelError(f"TensorRT {what} engine of {self.version} disagrees with "
                                 f"XGBoost by up to {worst:.2e} (> {tolerance})")

    def _engine(self, plan: Path) -> tuple[Any, Any, str, str]:
        if not plan.is_file():
            raise ModelError(f"TensorRT engine missing: {plan}")
        engine = self._runtime.deserialize_cuda_engine(plan.read_bytes())
        if engine is None:
            raise ModelError(f"TensorRT engine corrupted or built for another GPU: {plan}")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names
                  if engine.get_tensor_mode(n) == self._trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if len(inputs) != 1 or len(outputs) != 1:
            raise ModelError(f"{plan}: expected one input and one output tensor, got {names}")
        return engine, engine.create_execution_context(), inputs[0], outputs[0]

    def _run(self, compiled: tuple[Any, Any, str, str], features: Any) -> np.ndarray:
        cp = self._cp
        if features.shape[0] == 0:
            return np.zeros(0)
        _, ctx, inp, out = compiled
        x = cp.ascontiguousarray(cp.asarray(features, dtype=cp.float32))
        ctx.set_input_shape(inp, tuple(x.shape))
        y = cp.empty(tuple(ctx.get_tensor_shape(out)), dtype=cp.float32)
        ctx.set_tensor_address(inp, x.data.ptr)
        ctx.set_tensor_address(out, y.data.ptr)
        stream = cp.cuda.get_current_stream()
        if not ctx.execute_async_v3(stream.ptr):
            raise RuntimeError("TensorRT execution failed")
        stream.synchronize()
        return cp.asnumpy(y).astype(np.float64).reshape(-1)

    def predict_entry(self, features: Any) -> np.ndarray:
        """P(target first) [N] from entry rows [N, len(ENTRY_MODEL_FEATURES)]."""
        return self._run(self._entry, _check_rows(features, ENTRY_MODEL_FEATURES, "entry"))

    def predict_exit(self, features: Any) -> np.ndarray:
        """P(adverse move) [N] from exit rows [N, len(EXIT_MODEL_FEATURES)]."""
        return self._run(self._exit, _check_rows(features, EXIT_MODEL_FEATURES, "exit"))


def make_predictor(path: Path, backend: str = "auto", device: str | None = None) -> Predictor:
    """A predictor for the version folder ``path``.

    ``backend``: ``"xgboost"``, ``"tensorrt"``, or ``"auto"`` (TensorRT when usable and the
    folder has engines, falling back to XGBoost with a logged warning; else XGBoost).
    """
    path = Path(path)
    if backend == "xgboost":
        return XGBoostPredictor(path, device)
    if backend == "tensorrt":
        return TensorRTPredictor(path)
    if backend != "auto":
        raise ValueError(f"backend must be auto, xgboost or tensorrt, got {backend!r}")
    if tensorrt_usable() and (path / ENTRY_PLAN).is_file() and (path / EXIT_PLAN).is_file():
        try:
            return TensorRTPredictor(path)
        except Exception as exc:  # any TensorRT trouble: the boosters still serve
            log.warning("TensorRT backend unavailable for %s (%s); using XGBoost", path, exc)
    return XGBoostPredictor(path, device)


class ModelHolder:
    """The current model of ``model_dir`` for one process, loaded lazily and reloaded when the
    ``current`` pointer changes (its content or mtime, looked at every ``check_seconds`` at
    most). ``get()`` returns None when there is no model (trade on the rules alone) or when
    the current one failed to load; then ``problem`` says why, and the caller takes no new
    entries. Each state is logged once; a failed version is retried when the pointer
    changes."""

    def __init__(self, model_dir: Path, check_seconds: float = 5.0,
                 loader: Callable[[Path], Predictor] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.model_dir = Path(model_dir)
        self.check_seconds = float(check_seconds)
        self._loader = loader or make_predictor
        self._clock = clock
        self._lock = threading.Lock()
        self._checked: float | None = None
        self._key: tuple[Any, ...] | None = None
        self._model: Predictor | None = None
        self._problem: str | None = None

    @property
    def problem(self) -> str | None:
        """Why the version the pointer names is not usable (corrupted file, missing feature,
        wrong version), or None: no model at all, or a model loaded."""
        return self._problem

    def _pointer(self) -> tuple[tuple[Any, ...], str | None, str | None]:
        """(change key, version, problem) of the ``current`` pointer."""
        path = self.model_dir / CURRENT
        try:
            st = path.stat()
        except FileNotFoundError:
            return ("missing",), None, f"no current model in {self.model_dir}"
        except OSError as exc:
            return ("error", str(exc)), None, f"cannot read {path}: {exc}"
        try:
            version = read_current(self.model_dir)
        except ModelError as exc:
            return ("bad", st.st_mtime_ns, st.st_ino), None, str(exc)
        if version is None:  # removed between stat and read
            return ("missing",), None, f"no current model in {self.model_dir}"
        return (version, st.st_mtime_ns, st.st_ino), version, None

    def get(self) -> Predictor | None:
        """The current predictor, or None (trade on the rules alone)."""
        with self._lock:
            now = self._clock()
            if self._checked is not None and now - self._checked < self.check_seconds:
                return self._model
            self._checked = now
            key, version, problem = self._pointer()
            if key == self._key:
                return self._model
            self._key = key
            if version is None:
                self._model = None
                self._problem = problem if key and key[0] in ("bad", "error") else None
                if self._problem:
                    log.error("%s; no new entries until the pointer is fixed", problem)
                else:
                    log.warning("%s; trading on the rule strategies alone", problem)
                return None
            if self._model is not None and self._model.version == version:
                return self._model  # the pointer was rewritten with the same version
            try:
                self._model = self._loader(self.model_dir / version)
                self._problem = None
                log.info("model %s loaded", version)
            except Exception as exc:  # any load failure: no entries until the pointer changes
                self._model = None
                self._problem = f"model {version} not usable: {exc}"
                log.error("%s; no new entries until a usable version is current "
                          "(exits and end of day go on)", self._problem)
            return self._model

    @property
    def version(self) -> str | None:
        """Version of the loaded model (None when none is loaded); does not check the pointer."""
        model = self._model
        return None if model is None else model.version


def score_signals(predictor: Predictor, window: Any, symbols: Sequence[str],
                  bar_seconds: int, signals: Sequence[Signal], xp: ModuleType = np,
                  features: np.ndarray | None = None) -> np.ndarray:
    """Entry probabilities [len(signals)] for rule ``signals`` at the last bar of ``window``
    ([t+1, S, 5]); features exactly as in training (``entry_features_all`` + side +
    strategy). ``features``: that bar's entry features of every symbol ([S, F]) when the
    caller already has them (the backtester, from the whole session: the same numbers)."""
    if not signals:
        return np.zeros(0)
    index = {s: i for i, s in enumerate(symbols)}
    if features is not None:
        picked = features[[index[s.symbol] for s in signals]]
    else:
        # features of the signalled symbols only (each symbol's features use its own bars):
        # one batch, a fraction of the universe's cost; the all-bars form's last row is
        # bit-identical to the same row of a whole session's features (training computes
        # those, and the backtester precomputes them)
        cols = sorted({index[s.symbol] for s in signals})
        where = {c: k for k, c in enumerate(cols)}
        feats = _to_numpy(entry_features_all(window[:, cols], bar_seconds, xp)[-1])
        picked = feats[[where[index[s.symbol]] for s in signals]]
    rows = entry_model_rows(picked, [1 if s.side == "buy" else -1 for s in signals],
                            [strategy_id(s.source) for s in signals])
    return predictor.predict_entry(rows)


def exit_model(predictor: Predictor, bar_seconds: int,
               xp: ModuleType = np) -> Callable[..., np.ndarray]:
    """An ``core.scoring.ExitModel``: (window, symbol indexes, entry bars, directions, entry
    prices in US dollars) -> exit probability per held position, from ``predictor``."""

    def score(window: Any, idx: Any, entry_bar: Any, direction: Any, avg: Any) -> np.ndarray:
        feats = exit_features_all(window[:, idx], entry_bar, direction, avg, bar_seconds,
                                  xp)[-1]  # as in score_signals: the all-bars form's last row
        return predictor.predict_exit(exit_model_rows(_to_numpy(feats),
                                                      _to_numpy(direction)))

    return score
