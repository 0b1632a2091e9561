"""The spool's I/O thread, pure Python: the twin of the compiled ext/_spoolio.pyx.

The contract (both implementations): one thread executes requests strictly in submission order.
A request writes a list of bytes-like buffers at an offset of a file descriptor (os.pwritev,
across short writes) and then, if asked, fdatasyncs (DATASYNC) or fsyncs (FULLSYNC) it. The
caller (the segment writer, on the event loop) submits without blocking, watches ``done_fd``
(readable once a request has finished) and collects ``(bytes written, errno or 0)`` pairs from
``results()``; a request that failed reports the errno and the bytes it wrote before failing
(0 here). The buffers stay referenced until then. ``stop()`` lets the thread end after the
requests already submitted; ``join()`` waits for it and closes the pipes.

This twin takes the GIL after every blocking call, which is what the compiled one avoids.
"""

from __future__ import annotations

import collections
import errno as errno_mod
import os
import queue
import threading
from typing import Any

from .segment import write_all

ACCELERATED = False

NO_SYNC = 0
DATASYNC = 1
FULLSYNC = 2


def execute(fd: int, bufs: list[Any], offset: int, sync: int) -> tuple[int, int]:
    """Run one request on the calling thread: (bytes written, errno or 0)."""
    try:
        written = write_all(fd, bufs, offset) if bufs else 0
        if sync == DATASYNC:
            os.fdatasync(fd)
        elif sync == FULLSYNC:
            os.fsync(fd)
    except OSError as e:
        return 0, e.errno or errno_mod.EIO
    return written, 0


class IoThread:
    """One thread executing write-and-sync requests in order (see the module docstring)."""

    def __init__(self) -> None:
        self._requests: queue.SimpleQueue[tuple[int, list[Any], int, int] | None] = (
            queue.SimpleQueue()
        )
        self._finished: collections.deque[tuple[int, int]] = collections.deque()
        self._done_r, self._done_w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self._done_r, False)
        self._thread: threading.Thread | None = None

    @property
    def done_fd(self) -> int:
        return self._done_r

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="fastmta-spool-io", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            req = self._requests.get()
            if req is None:
                return
            self._finished.append(execute(*req))
            os.write(self._done_w, b"\0")

    def submit(self, fd: int, bufs: list[Any], offset: int, sync: int) -> None:
        self._requests.put((fd, list(bufs), offset, sync))

    def results(self) -> list[tuple[int, int]]:
        try:
            while os.read(self._done_r, 4096):
                pass
        except BlockingIOError:
            pass
        out = []
        while self._finished:
            out.append(self._finished.popleft())
        return out

    def stop(self) -> None:
        self._requests.put(None)

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                return
        for fd in (self._done_r, self._done_w):
            if fd >= 0:
                os.close(fd)
        self._done_r = self._done_w = -1
