"""The per-process runtime: built in ``worker_process_init`` (after the fork), or on first use."""

from __future__ import annotations

from celery.signals import worker_process_init

from core.config import get_settings
from core.runtime import Runtime, build_runtime

_runtime: Runtime | None = None


def get_runtime() -> Runtime:
    """This process's adapters, built once."""
    global _runtime
    if _runtime is None:
        _runtime = build_runtime(get_settings())
    return _runtime


def reset_runtime() -> None:
    """Forget the adapters (tests switch settings between cases)."""
    global _runtime
    _runtime = None


@worker_process_init.connect
def _init_process(**_: object) -> None:
    reset_runtime()
    get_runtime()
