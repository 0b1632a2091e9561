"""A fastmta SMTP listener (fastmta/server.py + a real spool) running in a background
thread, for tests and benchmarks that drive it with blocking clients (smtplib, swaks,
smtp-source). Delivery is not started: accepted messages are collected in ``submitted``."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

from ..config import Config, load_config
from ..server import Listening
from ..spool import Spool
from ..spool.records import StoredMessage


class ThreadedSmtpd:
    def __init__(
        self,
        spool_dir: str,
        overrides: dict[str, Any] | None = None,
        *,
        listener: int = 0,
        use_uvloop: bool = True,
        setup: Callable[[Listening], None] | None = None,
    ) -> None:
        base = {"server": {"spool_dir": spool_dir, "hostname": "mx.test", "workers": 1}}
        self.config: Config = load_config(None, _merge(base, overrides or {}))
        self.listener = self.config.listener[listener]
        self.spool_dir = spool_dir
        self.submitted: list[StoredMessage] = []
        self.use_uvloop = use_uvloop
        self.setup = setup
        self.port = 0
        self.ctx: Listening | None = None
        self.spool: Spool | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self) -> ThreadedSmtpd:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._error:
            raise self._error
        return self

    def _run(self) -> None:
        if self.use_uvloop:
            import uvloop

            loop = uvloop.new_event_loop()
        else:
            loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._start())
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        loop.run_forever()
        loop.run_until_complete(self._stop())
        loop.close()

    async def _start(self) -> None:
        from ..app import _local_check, _server_ssl, _users

        config = self.config
        self.spool = Spool(self.spool_dir)
        await self.spool.open()
        lst = self.listener
        ssl_ctx = _server_ssl(config) if lst.tls in ("starttls", "implicit") else None
        self.ctx = Listening(
            config,
            lst,
            self.spool,
            submit=self.submitted.append,
            users=_users(config),
            local_check=_local_check(config),
            ssl_context=ssl_ctx,
        )
        if self.setup:
            self.setup(self.ctx)
        host = lst.address.rsplit(":", 1)[0].strip("[]")  # the port is always a free one
        self.server = await asyncio.get_running_loop().create_server(
            self.ctx, host, 0, ssl=ssl_ctx if lst.tls == "implicit" else None
        )
        self.port = self.server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        self.server.close()
        assert self.ctx is not None and self.spool is not None
        await self.ctx.drain(2.0)
        await self.spool.close()

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the server's loop and return its result (for inspecting state)."""
        assert self._loop is not None
        fut: asyncio.Future[Any] = asyncio.run_coroutine_threadsafe(_acall(fn), self._loop)
        return fut.result(10)

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def __enter__(self) -> ThreadedSmtpd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def _acall(fn: Callable[[], Any]) -> Any:
    return fn()


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
