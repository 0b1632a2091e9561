"""Logging: human-readable lines for operators, JSON lines for delivery attempts.

``setup_logging(level, file)`` configures the root logger once per process (stderr, or a file that
logrotate may move: WatchedFileHandler). ``DeliveryLog`` appends one JSON object per message
taken into the queue (``ReceptionRecord``, outcome "received", like KumoMTA's Reception
records) and one per delivery attempt of each recipient (``DeliveryRecord``) to its file, so
that one queue id traces a message from its arrival to its last recipient: encoded by one
reused msgspec Encoder into one buffer,
written when the buffer passes ``buffer_size`` bytes, at least every ``flush_interval`` seconds
(a timer on the running event loop, or immediately when there is no loop), and on close.
Before each write it checks that its path still names the file it has open, and opens the path
again when logrotate (or anyone) moved or removed it, as WatchedFileHandler does, so rotation
needs no signal and no copytruncate.
"""

from __future__ import annotations

import asyncio
import logging
import logging.handlers
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import msgspec

__all__ = ["FINAL_OUTCOMES", "DeliveryLog", "DeliveryRecord", "ReceptionRecord", "setup_logging"]

# DeliveryRecord outcomes after which the recipient is done with (nothing more will happen)
FINAL_OUTCOMES = frozenset({"delivered", "bounced", "expired", "deleted"})

_FORMAT = "%(asctime)s.%(msecs)03d %(levelname)-7s %(name)s[%(process)d]: %(message)s"
_DATEFMT = "%Y-%m-%dT%H:%M:%S"
_handler: logging.Handler | None = None

log = logging.getLogger("fastmta.log")


def setup_logging(level: str = "info", file: str | None = "") -> logging.Handler:
    """Send log records at ``level`` and above to ``file`` ("" or None = stderr).

    Idempotent: calling it again replaces the handler it installed before (other handlers are
    left alone). Lines look like ``2024-05-01T12:00:00.123 INFO    fastmta.queue[4242]: text``
    (local time). Raises ValueError for an unknown level, OSError if the file cannot be opened.
    """
    global _handler
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    handler: logging.Handler
    if file:
        handler = logging.handlers.WatchedFileHandler(file, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT, _DATEFMT))
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
        _handler.close()
    root.addHandler(handler)
    root.setLevel(numeric)
    _handler = handler
    return handler


class DeliveryRecord(msgspec.Struct, kw_only=True, omit_defaults=False):
    """One delivery attempt of one recipient (one JSON line in the delivery log)."""

    time: float = 0.0  # unix time of the result; 0 -> filled with time.time() by write()
    queue_id: str
    recipient: str
    site: str = ""  # destination site (MX set) or "local"
    mx: str = ""  # host name of the MX used
    ip: str = ""  # peer IP address
    source: str = ""  # local address it was sent from (an egress source; "" = the OS's choice)
    tls: bool = False
    code: int = 0  # SMTP reply code (0 = no reply: connect failure, timeout)
    enhanced: str = ""  # RFC 3463 status, e.g. "4.4.1"
    text: str = ""
    latency: float = 0.0  # seconds for this attempt
    outcome: str  # "delivered" | "deferred" | "bounced" | "expired" | "deleted" (operator)
    attempt: int = 1
    classification: str = ""  # a failure's class (fastmta/delivery/classify.py), KumoMTA's names


class ReceptionRecord(msgspec.Struct, kw_only=True, omit_defaults=False):
    """One message taken into the queue (one JSON line in the delivery log)."""

    time: float = 0.0  # unix time it was durable; 0 -> filled with time.time() by write()
    queue_id: str
    outcome: str = "received"
    via: str  # "smtp" | "send" (fastmta send) | "api" | "dsn" (a DSN fastmta wrote)
    sender: str
    recipients: list[str]
    size: int
    client: str = ""  # "[ip] helo" over SMTP; "local (uid N)" from fastmta send
    auth: str = ""  # the SMTP AUTH user
    tls: bool = False  # received under TLS
    origin: str = ""  # a DSN: the queue id of the message it reports on
    message_id: str = ""  # the message's Message-ID: field, "<...>" (Postfix logs it too)

    @classmethod
    def of(cls, env: Any, via: str, *, tls: bool = False, origin: str = "") -> ReceptionRecord:
        """From a spool Envelope (fastmta.spool.records)."""
        return cls(
            queue_id=env.id,
            via=via,
            sender=env.sender,
            recipients=[r.address for r in env.recipients],
            size=env.size,
            client=env.client or "",
            auth=env.auth or "",
            tls=tls,
            origin=origin,
            message_id=env.message_id or "",
        )


class DeliveryLog:
    """Buffered JSON-lines writer for DeliveryRecords (append mode, not fsync'd: a log).

    ``write`` is cheap (encode into a bytearray). Write errors are logged once and the buffered
    lines dropped: delivery must not fail because the log disk is full.
    """

    def __init__(self, path: str | os.PathLike[str], *, flush_interval: float = 1.0,
                 buffer_size: int = 64 << 10) -> None:  # fmt: skip
        self.path = os.fspath(path)
        self.flush_interval = flush_interval
        self.buffer_size = buffer_size
        self._encoder = msgspec.json.Encoder()
        self._buf = bytearray()
        self._timer: asyncio.TimerHandle | None = None
        self._failed = False
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._fd: int | None = None
        self._identity = (0, 0)  # (st_dev, st_ino) of the open file
        self._open()
        self._subscribers: list[Callable[[DeliveryRecord | ReceptionRecord], None]] = []

    def subscribe(
        self, callback: Callable[[DeliveryRecord | ReceptionRecord], None]
    ) -> Callable[[], None]:
        """Call ``callback(record)`` with every record written from now on, on the writer's
        thread (the worker's event loop), as it is written; it must not block. A callback
        that raises is logged and dropped. Returns the function that ends the subscription.
        This is how the embedding API (fastmta/api.py) sees outcomes."""
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return unsubscribe

    def _notify(self, record: DeliveryRecord | ReceptionRecord) -> None:
        for callback in list(self._subscribers):
            try:
                callback(record)
            except Exception:
                log.exception("delivery log subscriber %r failed: dropped", callback)
                self._subscribers.remove(callback)

    def _open(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        st = os.fstat(fd)
        if self._fd is not None:
            os.close(self._fd)
        self._fd, self._identity = fd, (st.st_dev, st.st_ino)

    def _follow_rotation(self) -> None:
        """Open the path again if it no longer names the open file (moved or removed)."""
        try:
            st = os.stat(self.path)
            moved = (st.st_dev, st.st_ino) != self._identity
        except FileNotFoundError:
            moved = True
        if moved:
            self._open()

    def write(self, record: DeliveryRecord | ReceptionRecord) -> None:
        """Buffer one record; flushed within ``flush_interval`` seconds."""
        if self._fd is None:
            raise ValueError("DeliveryLog is closed")
        if not record.time:
            record.time = time.time()
        if self._subscribers:
            self._notify(record)
        self._encoder.encode_into(record, self._buf, -1)
        self._buf += b"\n"
        if len(self._buf) >= self.buffer_size:
            self.flush()
            return
        if self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()  # no loop to schedule on: write through
                return
            self._timer = loop.call_later(self.flush_interval, self.flush)

    def flush(self) -> None:
        """Write the buffered lines now."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._buf or self._fd is None:
            return
        data, self._buf = self._buf, bytearray()
        try:
            self._follow_rotation()
            view = memoryview(data)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
        except OSError as e:
            if not self._failed:
                log.error("delivery log %s: write failed, records dropped: %s", self.path, e)
            self._failed = True

    def close(self) -> None:
        """Flush and close. Idempotent."""
        if self._fd is None:
            return
        self.flush()
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> DeliveryLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
