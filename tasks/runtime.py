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


def _consumes_gpu_queue() -> bool:
    """True in a worker started with ``-Q gpu`` (the inference worker)."""
    try:
        from tasks.app import app

        return "gpu" in app.amqp.queues.consume_from
    except Exception:  # no worker context (eager tests): load lazily instead
        return False


@worker_process_init.connect
def _init_process(**_: object) -> None:
    """Build the adapters in the child, after the fork; the gpu worker also loads the current
    model here (CUDA, when used, is first touched in this child, never in the parent) and
    listens for published bars."""
    reset_runtime()
    rt = get_runtime()
    if _consumes_gpu_queue():
        if rt.models is not None:
            rt.models.get()
        # each published bar goes straight into this process's window (scoring seldom
        # has to read its bar from the store), and the bar's scoring work that needs no
        # position is done there, before its score task arrives; the fills-done marks
        # come the same way (scoring waits for them without polling), and with the
        # simulated broker what its fills change in the positions (scoring then reads
        # none of them from Redis)
        from core.engine import prepare_bar
        from core.market.bar_store import BarListener

        BarListener(rt.redis, rt.keys, rt.window,
                    on_bar=lambda day, bar: prepare_bar(rt, day, bar),
                    fills=rt.fills_mark,
                    on_positions=getattr(rt.broker, "apply_pushed", None)).start()
