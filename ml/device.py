"""Which device XGBoost uses: ``"cuda"`` when a GPU is usable, else ``"cpu"``.

A GPU is usable when the installed XGBoost was built with CUDA and the NVIDIA driver lists a
GPU (``/proc/driver/nvidia/gpus``), or cupy counts one. The driver check does not initialise
CUDA, so calling this in a Celery parent before the fork is harmless; cupy is only asked
when the driver listing is absent. The answer is computed once per process and logged once.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from pathlib import Path

log = logging.getLogger(__name__)

_DRIVER_GPUS = Path("/proc/driver/nvidia/gpus")


def _xgboost_has_cuda() -> bool:
    import xgboost as xgb

    try:
        return bool(xgb.build_info().get("USE_CUDA"))
    except Exception:  # an old or unusual build: assume CPU only
        return False


def _gpu_present() -> bool:
    try:
        if _DRIVER_GPUS.is_dir():
            return any(_DRIVER_GPUS.iterdir())
    except OSError:
        pass
    if importlib.util.find_spec("cupy") is None:
        return False
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount()) > 0
    except Exception:  # no driver, no device, broken install
        return False


@functools.cache
def cuda_available() -> bool:
    """True when XGBoost can train and predict on a CUDA GPU in this process."""
    return _xgboost_has_cuda() and _gpu_present()


@functools.cache
def xgb_device() -> str:
    """``"cuda"`` when a GPU is usable, else ``"cpu"`` (logged once per process)."""
    device = "cuda" if cuda_available() else "cpu"
    log.info("XGBoost device: %s", device)
    return device


def resolve_device(device: str | None) -> str:
    """``device`` as given (``"cpu"``, ``"cuda"``, ``"cuda:1"``), or the usable one if None."""
    if device is None or device == "auto":
        return xgb_device()
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"device must be cpu, cuda[:N] or auto, got {device!r}")
    return device
