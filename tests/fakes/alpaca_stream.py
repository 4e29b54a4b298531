"""The local stand-in for Alpaca's trade_updates WebSocket (``FakeAlpaca.stream``):
authentication with the account's key, ``listen``, then the events ``FakeAlpaca`` publishes,
in the order they happened; it can refuse or drop connections."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from tests.fakes.ws import ThreadedWsServer


class FakeTradeStream(ThreadedWsServer):
    """Alpaca's trade_updates WebSocket: authenticate, listen, then events. ``_conns``
    holds the connections listening to trade_updates."""

    name = "fake-alpaca-ws"

    def __init__(self, fake: Any) -> None:
        super().__init__()
        self.fake = fake
        self.refuse = False
        self.connections = 0  # successful authentications so far

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/stream"

    async def _serving(self) -> None:
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._sender_task = asyncio.get_running_loop().create_task(self._sender())

    async def _closing(self) -> None:
        self._sender_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._sender_task

    async def _handler(self, ws: Any) -> None:
        if self.refuse:
            await ws.close(1013, "try again later")
            return
        try:
            raw = await asyncio.wait_for(ws.recv(), 10)
            msg = json.loads(raw)
            data = msg.get("data") or {}
            key = data.get("key_id") or msg.get("key")
            secret = data.get("secret_key") or msg.get("secret")
            ok = key == self.fake.key and secret == self.fake.secret
            await ws.send(json.dumps({"stream": "authorization", "data": {
                "status": "authorized" if ok else "unauthorized",
                "action": "authenticate"}}))
            if not ok:
                await ws.close()
                return
            self.connections += 1
            raw = await asyncio.wait_for(ws.recv(), 10)
            streams = (json.loads(raw).get("data") or {}).get("streams") or []
            await ws.send(json.dumps({"stream": "listening", "data": {"streams": streams}}))
            if "trade_updates" in streams:
                self._conns[ws] = True
            async for _ in ws:
                pass
        except Exception:
            pass
        finally:
            self._conns.pop(ws, None)

    def publish(self, msg: dict[str, Any]) -> None:
        """Send an event to every listening client now (lost when none listens)."""
        if self._loop is None or self.refuse:
            return
        self._loop.call_soon_threadsafe(self._queue.put_nowait, json.dumps(msg))

    async def _sender(self) -> None:
        """One sender, so clients get the events in the order they happened."""
        while True:
            text = await self._queue.get()
            for ws in list(self._conns):
                try:
                    await ws.send(text)
                except Exception:
                    self._conns.pop(ws, None)

    def listening(self) -> int:
        return len(self._conns)
