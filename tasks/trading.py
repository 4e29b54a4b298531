"""The trading tasks. Each validates its JSON payload, calls one core function, returns JSON."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from celery.utils.log import get_task_logger
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from core import decide_step, engine, execution
from core.errors import TransientError
from tasks.app import app
from tasks.runtime import get_runtime

log = get_task_logger(__name__)

# Retry only what may succeed later: our transient errors and a Redis that is restarting.
# Rejections and bad payloads are final.
_RETRY = {"autoretry_for": (TransientError, RedisConnectionError, RedisTimeoutError),
          "retry_backoff": True, "retry_backoff_max": 30, "max_retries": 5,
          "retry_jitter": True}


class CeleryDispatcher:
    """Hands work to the next step through the queues (routes from celeryconfig)."""

    @property
    def concurrent(self) -> bool:
        """True when the next step runs in another process (not eagerly, inline): the tick
        may then hand a bar to scoring before it applied the bar's fills, and scoring waits
        for them (see ``core.engine.tick``)."""
        return not app.conf.task_always_eager

    _producer: Any = None  # the producer of an open ``batch``

    def score(self, payload: dict[str, Any]) -> None:
        # what Flower and the logs show, given here: Celery's generic repr of an argument
        # costs ~1 ms per KB, and decide's argument (the scored bar) is a few KB
        bar = f"(date={payload.get('date')!r}, bar={payload.get('bar')!r})"
        # decide rides in the message as score's callback (applied with score's result,
        # as a chain's next step is; eager mode too), built without a chain's machinery:
        # ~0.2 ms less on the tick path than chain(score.s(payload), decide.s())
        score.apply_async((payload,), argsrepr=bar,
                          link=decide.s().set(argsrepr=f"(scored {bar})"))

    def submit_order(self, intent: dict[str, Any]) -> None:
        submit_order.apply_async(args=(intent,), argsrepr=_order_repr(intent),
                                 producer=self._producer)

    def close_position(self, intent: dict[str, Any]) -> None:
        close_position.apply_async(args=(intent,), argsrepr=_order_repr(intent),
                                   producer=self._producer)

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Order tasks handed on inside go to Redis together, in one pipeline (kombu's
        producer batch; one by one where the transport or kombu has none). A failure
        inside discards what was not sent, and the task's retry sends it again."""
        with app.producer_or_acquire() as producer:
            make = getattr(producer, "batch", None)
            self._producer = producer
            try:
                with make() if make is not None else contextlib.nullcontext():
                    yield
            finally:
                self._producer = None


def _order_repr(intent: dict[str, Any]) -> str:
    """What Flower and the logs show for an order task: ids and symbol, cheap to build
    (Celery's generic saferepr of the whole intent costs ~0.2 ms a message)."""
    return (f"(client_order_id={intent.get('client_order_id')!r}, "
            f"symbol={intent.get('symbol')!r}, side={intent.get('side')!r}, "
            f"qty={intent.get('qty')!r}, reason={intent.get('reason')!r})")


DISPATCHER = CeleryDispatcher()


@app.task(name="tasks.tick")
def tick() -> dict[str, Any]:
    """Per-bar strategy tick (beat): publish the next bar and start scoring it."""
    return engine.tick(get_runtime(), DISPATCHER)


@app.task(name="tasks.score")
def score(payload: dict[str, Any]) -> dict[str, Any]:
    """Signals and marks for the universe at one bar (gpu queue); the result feeds decide."""
    return engine.score(get_runtime(), payload)


@app.task(name="tasks.decide", **_RETRY)
def decide(scored: dict[str, Any]) -> dict[str, Any]:
    """Turn a scored bar into order tasks."""
    return decide_step.decide_bar(get_runtime(), DISPATCHER, scored)


@app.task(name="tasks.submit_order", **_RETRY)
def submit_order(intent: dict[str, Any]) -> dict[str, Any]:
    """Reserve capital and submit one entry, exactly once per client_order_id."""
    return execution.submit_order(get_runtime(), intent)


@app.task(name="tasks.close_position", **_RETRY)
def close_position(intent: dict[str, Any]) -> dict[str, Any]:
    """Close one position, exactly once per client_order_id."""
    return execution.close_position(get_runtime(), intent)


@app.task(name="tasks.eod_close", **_RETRY)
def eod_close() -> dict[str, Any]:
    """Flatten inside the EOD window before the session's real close (idempotent)."""
    return execution.eod_close(get_runtime())


@app.task(name="tasks.flatten_all", **_RETRY)
def flatten_all(reason: str = "flatten") -> dict[str, Any]:
    """Kill switch: halt entries, cancel working entries, close every position."""
    result = execution.flatten_all(get_runtime(), reason)
    log.warning("flatten_all: %s", result)
    return result


@app.task(name="tasks.resume_trading")
def resume_trading() -> dict[str, Any]:
    """Clear the kill switch."""
    return execution.resume_trading(get_runtime())


@app.task(name="tasks.reconcile", **_RETRY)
def reconcile(date: str | None = None) -> dict[str, Any]:
    """Rebuild today's used capital and entries from the broker (start-up and periodic)."""
    rt = get_runtime()
    meta, _ = rt.session_now()
    if date is None and meta is None:
        return {"status": "no_session"}
    import datetime as dt

    day = dt.date.fromisoformat(date) if date else meta.date  # type: ignore[union-attr]
    return execution.reconcile(rt, day)


@app.task(name="tasks.train_models", soft_time_limit=3 * 3600, time_limit=3 * 3600 + 60)
def train_models() -> dict[str, Any]:
    """Nightly training on the gpu queue (beat, after the close): the last TRAIN_DAYS
    sessions of TRAIN_DATA; the new version becomes current only if it beats the current
    one. The serving worker picks it up without a restart."""
    from ml.train import train_from_files

    settings = get_runtime().settings
    if settings.train_data is None:
        log.warning("nightly training skipped: TRADING_TRAIN_DATA is not set")
        return {"status": "skipped", "reason": "TRADING_TRAIN_DATA not set"}
    run = train_from_files(settings.train_data, settings.model_dir, settings,
                           last_days=settings.train_days, progress=False)
    log.info("nightly training wrote %s: %s", run.version, run.reason)
    return {"status": "trained", "version": run.version, "promoted": run.promoted,
            "reason": run.reason}


@app.task(name="tasks.ping")
def ping(payload: dict[str, Any] | None = None) -> dict[str, Any]:
    """Empty task for health checks and the bare-chain baseline of the latency benchmark."""
    return payload or {}
