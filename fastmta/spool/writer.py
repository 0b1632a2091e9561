"""The group-commit writer thread: the only code that writes, fsyncs, creates or deletes segments.

The event loop submits Tickets (thread-safe, never blocks); the writer takes everything queued
since its last sync (up to max_batch_bytes), appends it with os.pwritev, calls os.fdatasync once
for the whole group, and hands the finished Tickets back to the loop with one
loop.call_soon_threadsafe per group. fsync never runs on the event-loop thread.

On a write/sync failure the segment is truncated back to its last synced size (so a failed
record can never be recovered later), the group's MESSAGE tickets fail with SpoolError, and its
UPDATE/DONE tickets are retried with the next group. If even the truncation fails, the segment
is abandoned (never appended to again) and the next record starts a new segment, so any garbage
stays a torn tail that recovery cuts off.
"""

from __future__ import annotations

import dataclasses
import errno as errno_mod
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from .errors import SpoolError
from .segment import HEADER_SIZE, frame, fsync_dir, segment_name

log = logging.getLogger("fastmta.spool")

IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024

# Group commit under load: when the last fdatasync was less than BUSY_WINDOW seconds ago, the
# writer waits commit_delay before taking a batch, so concurrent sessions share one fdatasync
# (like PostgreSQL's commit_delay). An idle spool syncs at once.
BUSY_WINDOW = 0.005

# Ticket kinds
RECORD = 0  # append a record (MESSAGE, UPDATE or DONE)
BARRIER = 1  # completes once everything submitted before it is durable (flush/close)
DELETE = 2  # unlink a segment (after everything before it is durable)
STOP = 3  # flush, then end the thread


@dataclasses.dataclass
class SpoolStats:
    """Counters for benchmarks and logs. Written by the writer thread, read anywhere."""

    messages: int = 0  # MESSAGE records durably stored
    records: int = 0  # all records durably written
    bytes: int = 0  # bytes written to segments
    fsyncs: int = 0  # fdatasync calls on segments (group commits)
    groups: int = 0  # write groups (one pwritev series + one fdatasync each)
    segments_created: int = 0
    segments_deleted: int = 0
    write_errors: int = 0
    adopted: int = 0  # injected messages adopted into this spool
    moved: int = 0  # live messages copied out of sparse segments (Spool.compact)
    parked: int = 0  # messages moved out of memory into parked files (Spool.park)
    unparked: int = 0  # messages loaded back from parked files (Spool.unpark)
    recovered: int = 0  # live messages found by open()
    truncated_bytes: int = 0  # torn-tail bytes cut off by open()


class Ticket:
    """One unit of work for the writer. Fields after `ctx` are filled in by the writer."""

    __slots__ = ("kind", "rtype", "payload", "size", "fut", "ctx", "segment", "offset", "error")

    def __init__(
        self,
        kind: int,
        rtype: int = 0,
        payload: list[Any] | None = None,
        size: int = 0,
        fut: Any = None,
        ctx: Any = None,
    ) -> None:
        self.kind = kind
        self.rtype = rtype
        self.payload = payload  # pieces of the record payload (bytes-like), not copied
        self.size = size  # payload length
        self.fut = fut  # asyncio.Future resolved by the loop-side completion, or None
        self.ctx = ctx  # loop-side context (envelope, referenced segment, ...)
        self.segment = 0  # where the record landed
        self.offset = 0  # offset of the record header in that segment
        self.error: BaseException | None = None


def write_all(fd: int, bufs: list[Any], offset: int) -> int:
    """pwritev all of `bufs` at `offset`, across IOV_MAX chunks and short writes. Returns bytes.

    `bufs` is consumed (modified in place).
    """
    total = 0
    i = 0
    n_bufs = len(bufs)
    while i < n_bufs:
        n = os.pwritev(fd, bufs[i : i + IOV_MAX], offset)
        if n <= 0:
            raise OSError(errno_mod.EIO, "pwritev wrote nothing")
        offset += n
        total += n
        while n > 0:
            ln = len(bufs[i])
            if n >= ln:
                n -= ln
                i += 1
            else:
                bufs[i] = memoryview(bufs[i])[n:]
                n = 0
    return total


class SegmentWriter:
    """Owns the active segment file. All methods except submit/start run on the writer thread."""

    def __init__(
        self,
        directory: str,
        next_segment: int,
        notify: Callable[[list[Ticket]], None],
        stats: SpoolStats,
        *,
        fsync: bool = True,
        segment_size: int = 64 << 20,
        max_batch_bytes: int = 8 << 20,
        commit_delay: float = 0.0,
    ) -> None:
        self._dir = directory
        self._notify = notify  # called on the writer thread; must hop to the loop itself
        self._stats = stats
        self._fsync = fsync
        self._segment_size = segment_size
        self._max_batch = max_batch_bytes
        self._q: queue.SimpleQueue[Ticket] = queue.SimpleQueue()
        self._retry: list[Ticket] = []  # UPDATE/DONE records whose group failed
        self._seg = next_segment - 1  # number of the active (or last) segment
        self._fd: int | None = None
        self._size = 0  # synced size of the active segment
        self._commit_delay = commit_delay
        self._last_sync = 0.0
        self._thread = threading.Thread(target=self._run, name="fastmta-spool-writer", daemon=True)

    # --- any thread ---------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, ticket: Ticket) -> None:
        """Queue a ticket. Never blocks."""
        self._q.put(ticket)

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    # --- writer thread ------------------------------------------------------------------------
    def _run(self) -> None:
        stop = False
        try:
            while not stop:
                first = self._q.get()
                delay = self._commit_delay
                if delay and time.monotonic() - self._last_sync < BUSY_WINDOW:
                    time.sleep(delay)  # busy: let a few more records join this group
                batch = self._retry
                self._retry = []
                batch.append(first)
                nbytes = first.size
                while nbytes < self._max_batch:
                    try:
                        t = self._q.get_nowait()
                    except queue.Empty:
                        break
                    batch.append(t)
                    nbytes += t.size
                stop = self._process(batch)
        except BaseException:  # a bug: fail loudly rather than hang every caller
            log.exception("spool writer thread died")
            raise
        finally:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def _process(self, batch: list[Ticket]) -> bool:
        pending: list[Ticket] = []
        pending_bytes = 0
        stop = False
        for t in batch:
            kind = t.kind
            if kind == RECORD:
                need = HEADER_SIZE + t.size
                end = self._size + pending_bytes
                if self._fd is None or (end > 0 and end + need > self._segment_size):
                    self._flush(pending)
                    pending = []
                    pending_bytes = 0
                    try:
                        self._roll()
                    except OSError as e:
                        self._fail([t], e)
                        continue
                t.segment = self._seg
                t.offset = self._size + pending_bytes
                pending.append(t)
                pending_bytes += need
                continue
            self._flush(pending)
            pending = []
            pending_bytes = 0
            if kind == DELETE:
                self._delete(t.ctx)
            elif kind == BARRIER or kind == STOP:
                if self._retry:
                    t.error = SpoolError("spool updates could not be written; will retry")
                self._notify([t])
                stop = stop or kind == STOP
        self._flush(pending)
        return stop

    def _flush(self, pending: list[Ticket]) -> None:
        """Append `pending` to the active segment and fdatasync once (the group commit)."""
        if not pending:
            return
        iov: list[Any] = []
        for t in pending:
            iov.extend(frame(t.rtype, t.payload))
        fd = self._fd
        assert fd is not None
        try:
            written = write_all(fd, iov, self._size)
            if self._fsync:
                os.fdatasync(fd)
                self._stats.fsyncs += 1
                self._last_sync = time.monotonic()
        except OSError as e:
            self._undo_failed_write()
            self._fail(pending, e)
            return
        self._size += written
        st = self._stats
        st.groups += 1
        st.records += len(pending)
        st.bytes += written
        for t in pending:
            t.payload = None  # drop the message bytes early
        self._notify(pending)

    def _fail(self, tickets: list[Ticket], exc: OSError) -> None:
        self._stats.write_errors += 1
        log.error("spool write failed in %s: %s", self._dir, exc)
        err = SpoolError(f"spool write failed: {exc}", exc.errno)
        failed = []
        for t in tickets:
            if t.fut is None:
                self._retry.append(t)  # UPDATE/DONE: not the caller's to lose; retry next group
            else:
                t.error = err
                failed.append(t)
        if failed:
            self._notify(failed)

    def _undo_failed_write(self) -> None:
        """Cut the active segment back to its last synced size; abandon it if that fails."""
        fd = self._fd
        assert fd is not None
        try:
            os.ftruncate(fd, self._size)
            if self._fsync:
                os.fdatasync(fd)
        except OSError as e:
            log.error(
                "cannot truncate segment %d after a failed write (%s): abandoning it", self._seg, e
            )
            os.close(fd)
            self._fd = None

    def _roll(self) -> None:
        """Close the active segment (already synced) and create the next one; fsync the dir."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        n = self._seg + 1
        while True:
            path = os.path.join(self._dir, segment_name(n))
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                break
            except FileExistsError:
                n += 1  # never append to a file we did not create in this run
        try:
            if self._fsync:
                fsync_dir(self._dir)
        except OSError:
            os.close(fd)
            try:
                os.unlink(path)
            except OSError:
                pass
            raise
        self._fd, self._seg, self._size = fd, n, 0
        self._stats.segments_created += 1

    def _delete(self, number: int) -> None:
        if number == self._seg and self._fd is not None:
            return  # defensive: never delete the segment being appended to
        try:
            os.unlink(os.path.join(self._dir, segment_name(number)))
            if self._fsync:
                fsync_dir(self._dir)  # in order: a later deletion never overtakes this one
            self._stats.segments_deleted += 1
        except FileNotFoundError:
            pass
        except OSError as e:
            log.error("cannot delete segment %d: %s", number, e)
