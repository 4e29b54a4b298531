"""The shared life cycle of the local WebSocket servers the tests talk to: an asyncio loop
in a daemon thread on 127.0.0.1 and a free port, ``start``/``stop`` and use as a context
manager, ``_call`` to run a coroutine on that loop, ``drop`` to cut every connection.
A subclass provides ``_handler(conn)`` and keeps its connections in ``_conns``."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any


class ThreadedWsServer:
    """Base of the fake vendor streams (see the module docstring)."""

    name = "fake-ws"

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._conns: dict[Any, Any] = {}
        self._ready = threading.Event()
        self.port = 0

    async def _handler(self, conn: Any) -> None:
        raise NotImplementedError

    async def _serving(self) -> None:
        """Runs on the loop once the server listens, before ``start`` returns."""

    async def _closing(self) -> None:
        """Runs on the loop when ``stop`` begins (cancel the subclass's own tasks here)."""

    def _run(self) -> None:
        from websockets.asyncio.server import serve

        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)

        async def main() -> None:
            self._server = await serve(self._handler, "127.0.0.1", 0)
            self.port = self._server.sockets[0].getsockname()[1]
            await self._serving()
            self._ready.set()
            await self._server.serve_forever()

        with contextlib.suppress(asyncio.CancelledError, RuntimeError):
            loop.run_until_complete(main())
        loop.close()

    def start(self) -> Any:
        self._thread = threading.Thread(target=self._run, daemon=True, name=self.name)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError(f"{self.name} did not start")
        return self

    def _call(self, coro: Any, timeout: float = 5.0) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def stop(self) -> None:
        if self._loop is None:
            return

        async def shutdown() -> None:
            await self._closing()
            for conn in list(self._conns):
                conn.transport.abort()
            self._server.close()

        with contextlib.suppress(Exception):
            self._call(shutdown())
        if self._thread is not None:
            self._thread.join(5)
        self._loop = None

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def drop(self) -> None:
        """Abort every connection (the client sees an abnormal closure, code 1006)."""

        async def go() -> None:
            for conn in list(self._conns):
                conn.transport.abort()
            self._conns.clear()

        self._call(go())
