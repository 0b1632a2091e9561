"""Embedding fastmta in a Python program: one worker on the caller's event loop.

    async with MTA({"server": {"spool_dir": "/var/spool/myapp"},
                    "delivery": {"relayhost": "[smtp.example.net]:587"}}) as mta:
        queue_id = await mta.submit("app@example.org", ["user@example.com"], message_bytes)

``submit`` returns once the message is durable in the spool (the same promise as a 250 over
SMTP); delivery, retries and bounces then run as for mail received over SMTP. Listeners from
the config are started too, so the embedded MTA can also accept SMTP (pass ``listen=False``
to skip them). A message whose From: domain has a ``[[dkim]]`` key is signed before it is
stored, as mail from a trusted SMTP client is.

What happens next is told as the delivery log tells it (``fastmta.log`` records):

    results = await mta.send(sender, recipients, message, timeout=30)
    # {"user@example.com": DeliveryRecord(outcome="delivered", code=250, mx=..., ...)}

    async with mta.records() as records:       # every record from now on
        async for record in records:           # ReceptionRecord | DeliveryRecord
            ...

``send`` is ``submit`` and then a wait until every recipient is final (delivered, bounced,
expired, or deleted by an operator); on timeout the message stays queued and is delivered
as usual. ``records`` is KumoMTA's log hook for the embedding program.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from typing import Any

from .aliases import AliasError, Aliases
from .app import Worker
from .config import Config, load_config
from .headers import header_block_end, message_id
from .log import FINAL_OUTCOMES, DeliveryLog, DeliveryRecord, ReceptionRecord
from .protocol.errors import ParseError
from .protocol.parse import dot_stuff, parse_mail, parse_rcpt
from .spool.records import Envelope, Recipient, StoredMessage, new_queue_id

Record = DeliveryRecord | ReceptionRecord


class MTA:
    """A fastmta worker owned by the caller's event loop (see the module docstring)."""

    def __init__(
        self, config: Config | dict[str, Any] | None = None, *, listen: bool = True
    ) -> None:
        if not isinstance(config, Config):
            config = load_config(None, config or {})
        if not listen:
            import msgspec

            config = msgspec.structs.replace(config, listener=[])
        self.config = config
        self.worker = Worker(config)
        self.aliases = Aliases.from_config(config)
        self._waiting: set[asyncio.Future[None]] = set()  # send() calls in progress

    async def start(self) -> None:
        await self.worker.start()

    async def stop(self) -> None:
        await self.worker.stop()
        for fut in self._waiting:  # their messages stay queued for the next start
            if not fut.done():
                fut.set_exception(RuntimeError("the MTA stopped before the message was final"))

    async def __aenter__(self) -> MTA:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def submit(self, sender: str, recipients: list[str], message: bytes) -> str:
        """Queue ``message`` (RFC 5322 bytes; CRLF or bare LF line ends) from ``sender`` ("" for
        the null sender) to ``recipients``. Returns the queue id once it is durable. Raises
        ValueError with the SMTP reply text for an address the SMTP server would refuse."""
        stored = await self._store(sender, recipients, message)
        self.worker.received(stored, "api")
        return stored.envelope.id

    async def send(
        self, sender: str, recipients: list[str], message: bytes, *, timeout: float | None = None
    ) -> dict[str, DeliveryRecord]:
        """:meth:`submit`, then wait until every recipient (after [aliases]) is final. Returns
        the last delivery-log record of each: ``outcome`` "delivered", "bounced", "expired"
        or "deleted", with the reply code and text, MX host, IP, TLS and attempt. Raises
        TimeoutError after ``timeout`` seconds (the message stays queued and is delivered,
        retried or bounced as usual), and ValueError as submit does."""
        stored = await self._store(sender, recipients, message)
        qid = stored.envelope.id
        pending = {r.address for r in stored.envelope.recipients}
        results: dict[str, DeliveryRecord] = {}
        done = asyncio.get_running_loop().create_future()

        def on_record(rec: Record) -> None:
            if (
                isinstance(rec, DeliveryRecord)
                and rec.queue_id == qid
                and rec.outcome in FINAL_OUTCOMES
                and rec.recipient in pending
            ):
                pending.discard(rec.recipient)
                results[rec.recipient] = rec
                if not pending and not done.done():
                    done.set_result(None)

        unsubscribe = self._log().subscribe(on_record)
        self._waiting.add(done)
        try:
            self.worker.received(stored, "api")  # (delivery begins only now)
            await asyncio.wait_for(asyncio.shield(done), timeout)
        finally:
            unsubscribe()
            self._waiting.discard(done)
        return {r.address: results[r.address] for r in stored.envelope.recipients}

    def records(self, *, maxsize: int = 10_000) -> Records:
        """Every record the delivery log gets from now on (messages received, each delivery
        attempt's outcome), as an async iterator; use it in ``async with`` (or call
        ``close()``) to end it. It keeps at most ``maxsize`` records unread; when the reader
        falls further behind the oldest are dropped (counted in ``Records.dropped``)."""
        return Records(self._log(), maxsize)

    def _log(self) -> DeliveryLog:
        if self.worker.delivery_log is None:
            raise RuntimeError("the MTA is not started (use `async with MTA(...)` or start())")
        return self.worker.delivery_log

    async def _store(self, sender: str, recipients: list[str], message: bytes) -> StoredMessage:
        if not recipients:
            raise ValueError("no recipients")
        utf8 = not (sender.isascii() and all(r.isascii() for r in recipients))
        try:
            parse_mail(f"FROM:<{sender}>{' SMTPUTF8' if utf8 else ''}".encode())
            for r in recipients:
                parse_rcpt(f"TO:<{r}>".encode(), utf8)
        except ParseError as e:
            raise ValueError(f"{e.code} {e.enhanced} {e.text}") from None
        wire = dot_stuff(message, terminate=False)
        signer = self.worker.dkim.for_message(wire)
        if signer is not None:
            wire = signer.sign(wire) + wire
        try:
            expanded = self.aliases.recipients(Recipient(r) for r in recipients)
        except AliasError as e:
            raise ValueError(" ".join(map(str, e.reply))) from None
        env = Envelope(
            id=new_queue_id(),
            sender=sender,
            recipients=expanded,
            arrival=time.time(),
            body=None if wire.isascii() else "8BITMIME",
            smtputf8=utf8 or not all(r.address.isascii() for r in expanded),
            client="api",
            message_id=message_id(header_block_end([wire])[0]),
        )
        if self.worker.engine is None:
            raise RuntimeError("the MTA is not started (use `async with MTA(...)` or start())")
        return await self.worker.spool.store(env, wire)


class Records:
    """An async iterator over delivery-log records (see :meth:`MTA.records`)."""

    def __init__(self, log: DeliveryLog, maxsize: int) -> None:
        self._queue: collections.deque[Record] = collections.deque()
        self._maxsize = max(1, maxsize)
        self._wakeup: asyncio.Future[None] | None = None
        self._closed = False
        self.dropped = 0  # records lost because the reader fell behind
        self._unsubscribe: Callable[[], None] = log.subscribe(self._put)

    def _put(self, record: Record) -> None:
        if len(self._queue) >= self._maxsize:
            self._queue.popleft()
            self.dropped += 1
        self._queue.append(record)
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    def close(self) -> None:
        """End the subscription; a reader waiting for a record gets StopAsyncIteration."""
        self._closed = True
        self._unsubscribe()
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    def __aiter__(self) -> Records:
        return self

    async def __anext__(self) -> Record:
        while not self._queue:
            if self._closed:
                raise StopAsyncIteration
            self._wakeup = asyncio.get_running_loop().create_future()
            await self._wakeup
        return self._queue.popleft()

    async def __aenter__(self) -> Records:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
