"""The Celery app ``app`` and the task modules (thin: validate, call core, return JSON).

``celery -A tasks worker -Q gpu,exec`` and ``celery -A tasks beat`` use this app.
"""

from tasks import trading  # noqa: F401  (registers the tasks)
from tasks.app import app

__all__ = ["app"]
