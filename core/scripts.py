"""Lua scripts on pipelines and transactions, without redis-py's hidden round trip.

redis-py queues a registered script on a pipeline as EVALSHA and, before every such
pipeline runs, asks the server SCRIPT EXISTS: a round trip of its own on the hot path.
``queue_script`` queues EVAL with the script's source instead (a few hundred bytes more,
the server still compiles each script once) and so can never fail with NOSCRIPT inside a
transaction either (after a Redis restart or SCRIPT FLUSH, where EVALSHA would fail alone
while the transaction's other commands run). The in-memory Redis's scripts are queued as
they are (its pipelines run the Python twins in order).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

_REGISTERED: weakref.WeakKeyDictionary[Any, dict[str, Callable[..., Any]]] = (
    weakref.WeakKeyDictionary())


def registered(redis: Any, source: str) -> Callable[..., Any]:
    """``redis.register_script(source)``, made once per client (objects built per call,
    such as a lock per order, share it)."""
    per_client = _REGISTERED.get(redis)
    if per_client is None:
        per_client = _REGISTERED[redis] = {}
    script = per_client.get(source)
    if script is None:
        script = per_client[source] = redis.register_script(source)
    return script


def queue_script(pipe: Any, script: Callable[..., Any], keys: Sequence[Any],
                 args: Sequence[Any]) -> None:
    """Queue ``script`` (from ``register_script``) with ``keys`` and ``args`` on ``pipe``;
    its reply comes in the pipeline's replies at this place."""
    source = getattr(script, "script", None)
    if isinstance(source, str | bytes):
        pipe.eval(source, len(keys), *keys, *args)
    else:  # the in-memory Redis: its pipeline queues the twin
        script(keys=list(keys), args=list(args), client=pipe)
