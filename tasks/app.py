"""The Celery application, configured from ``celeryconfig`` and ``beat_schedule``."""

from __future__ import annotations

import json
from typing import Any

from celery import Celery, Task
from celery.signals import after_setup_logger, after_setup_task_logger

from beat_schedule import build_schedule
from core.config import get_settings


class TradingTask(Task):
    """Base task: in eager mode, round-trip arguments through JSON as a real broker would."""

    # The worker logs each result through Celery's saferepr, which costs ~1 ms per KB:
    # keep the log line short on the hot path.
    resultrepr_maxsize = 256

    def apply(self, args: Any = None, kwargs: Any = None, *a: Any, **kw: Any) -> Any:
        args = json.loads(json.dumps(list(args or ())))
        kwargs = json.loads(json.dumps(dict(kwargs or {})))
        return super().apply(args, kwargs, *a, **kw)


app = Celery("tasks", task_cls=TradingTask)
app.config_from_object("celeryconfig")
app.conf.beat_schedule = build_schedule(get_settings())


@after_setup_logger.connect
@after_setup_task_logger.connect
def _structured_logs(logger: Any = None, **_: Any) -> None:
    """Workers and beat log the records' extra fields and never a secret."""
    from core.logs import install

    install(get_settings(), logger)
