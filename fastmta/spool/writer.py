"""The group-commit segment writer: the only code that writes, fsyncs, creates or deletes segments.

It runs on the event loop; its file I/O runs on one I/O thread (iothread.py: compiled, it never
takes the GIL). The loop submits Tickets (never blocks); when no request is in flight the writer
frames everything queued since (up to max_batch_bytes) into one request: one pwritev series and
one fdatasync for the whole group, on the I/O thread. What arrives meanwhile forms the next
group, so concurrent sessions share fsyncs. Creating a segment (with an fsync of the directory)
and deleting one are requests in the same order. fsync never runs on the event-loop thread.

On a write/sync failure the segment is truncated back to its last synced size (so a failed
record can never be recovered later), the group's MESSAGE tickets fail with SpoolError, and its
UPDATE/DONE tickets are retried with the next group. If even the truncation fails, the segment
is abandoned (never appended to again) and the next record starts a new segment, so any garbage
stays a torn tail that recovery cuts off.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import os
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from .errors import SpoolError
from .iothread import DATASYNC, FULLSYNC, NO_SYNC, IoThread
from .segment import HEADER_SIZE, frame, segment_name

log = logging.getLogger("fastmta.spool")

# Group commit under load: when the last fdatasync was less than BUSY_WINDOW seconds ago, the
# writer waits commit_delay before taking a group, so concurrent sessions share one fdatasync
# (like PostgreSQL's commit_delay). An idle spool syncs at once.
BUSY_WINDOW = 0.005

# Ticket kinds
RECORD = 0  # append a record (MESSAGE, UPDATE or DONE)
BARRIER = 1  # completes once everything submitted before it is durable (flush/close)
DELETE = 2  # unlink a segment (after everything before it is durable)
STOP = 3  # flush, then end the I/O thread


@dataclasses.dataclass
class SpoolStats:
    """Counters for benchmarks and logs (event-loop thread)."""

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
    damaged_bytes: int = 0  # bytes of damaged records inside segments skipped by open()


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


class SegmentWriter:
    """Owns the active segment file. Event-loop thread only; ``notify`` gets finished Tickets."""

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
        self._notify = notify
        self._stats = stats
        self._fsync = fsync
        self._sync = DATASYNC if fsync else NO_SYNC
        self._segment_size = segment_size
        self._max_batch = max_batch_bytes
        self._commit_delay = commit_delay
        self._queue: collections.deque[Ticket] = collections.deque()
        self._retry: list[Ticket] = []  # UPDATE/DONE records whose group failed
        self._seg = next_segment - 1  # number of the active (or last) segment
        self._fd: int | None = None
        self._dir_fd: int | None = None
        self._size = 0  # synced size of the active segment
        self._last_sync = 0.0
        self._io = IoThread()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._then: Callable[[int, int], None] | None = None  # handles the request in flight
        self._due: asyncio.Handle | None = None  # _advance called soon, or after the delay
        self._delayed = False  # the commit delay for the next group has been waited
        self._stopped = False

    # --- API ------------------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._dir_fd = os.open(self._dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._io.start()
        self._loop.add_reader(self._io.done_fd, self._io_done)

    def submit(self, ticket: Ticket) -> None:
        """Queue a ticket. Never blocks."""
        self._queue.append(ticket)
        if self._due is None and self._then is None:
            self._call()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the I/O thread to end (after STOP); any thread."""
        self._io.join(timeout)

    # --- the sequence -------------------------------------------------------------------------
    def _request(self, fd: int, bufs: list[Any], offset: int, sync: int, then) -> None:
        self._then = then
        self._io.submit(fd, bufs, offset, sync)

    def _io_done(self) -> None:
        done = self._io.results()
        for written, err in done:
            then, self._then = self._then, None
            if then is not None:
                then(written, err)
        if done:
            self._advance()

    def _call(self, delay: float = 0.0) -> None:
        """Have _advance run soon, or after ``delay`` (the commit delay): one call pending at
        most, a delay replacing a sooner call."""
        due = self._due
        if due is not None:
            if not delay:
                return
            due.cancel()
        if delay:
            self._due = self._loop.call_later(delay, self._on_due, True)
        else:
            self._due = self._loop.call_soon(self._on_due, False)

    def _on_due(self, delayed: bool) -> None:
        self._due = None
        if delayed:
            self._delayed = True
        self._advance()

    def _advance(self) -> None:
        """Work through the queue in order until a request is in flight or nothing is left.

        Records whose group failed (``_retry``) go out with the next group, before the queue's
        head; a flush or close queued when they failed reports the failure instead."""
        q = self._queue
        while self._then is None and not self._stopped and q:
            t = q[0]
            if t.kind == RECORD or (self._retry and t.error is None):
                if self._wait_for_company():
                    return
                if self._fd is None or (
                    t.kind == RECORD and not self._retry and self._must_roll(t)
                ):
                    self._roll()
                else:
                    self._write_group()
                continue
            q.popleft()
            if t.kind == DELETE:
                self._delete(t.ctx)
            else:  # BARRIER or STOP: everything before it is durable (or failed)
                if self._retry and t.error is None:
                    t.error = SpoolError("spool updates could not be written; will retry")
                if t.kind == STOP:
                    self._stop()
                self._notify([t])

    def _wait_for_company(self) -> bool:
        """Under load, let the commit delay gather a group first (True: scheduled)."""
        delay = self._commit_delay
        if self._delayed or not delay or time.monotonic() - self._last_sync >= BUSY_WINDOW:
            return False
        self._call(delay)
        return True

    def _must_roll(self, t: Ticket) -> bool:
        """``t`` does not fit the active segment (a record bigger than a segment gets its own)."""
        return self._size > 0 and self._size + HEADER_SIZE + t.size > self._segment_size

    def _write_group(self) -> None:
        """Frame the retried records and the queued ones that fit (one segment, max_batch_bytes)
        into one request: pwritev + fdatasync on the I/O thread."""
        self._delayed = False
        q = self._queue
        group, self._retry = self._retry, []
        end = self._size
        for t in group:
            t.segment = self._seg
            t.offset = end
            end += HEADER_SIZE + t.size
        while q and q[0].kind == RECORD and end - self._size < self._max_batch:
            t = q[0]
            need = HEADER_SIZE + t.size
            if end > 0 and end + need > self._segment_size and group:
                break  # the next group starts a new segment
            q.popleft()
            t.segment = self._seg
            t.offset = end
            end += need
            group.append(t)
        assert self._fd is not None
        iov: list[Any] = []
        for t in group:
            iov.extend(frame(t.rtype, t.payload))
        self._request(self._fd, iov, self._size, self._sync, partial(self._written, group, end))

    def _written(self, group: list[Ticket], end: int, written: int, err: int) -> None:
        if err:
            self._write_failed(group, err)
            return
        self._size = end
        st = self._stats
        if self._fsync:
            st.fsyncs += 1
            self._last_sync = time.monotonic()
        st.groups += 1
        st.records += len(group)
        st.bytes += written
        for t in group:
            t.payload = None  # drop the message bytes early
        self._notify(group)

    def _write_failed(self, group: list[Ticket], err: int) -> None:
        """Cut the segment back to its synced size, then fail (or queue for retry) the group."""
        exc = OSError(err, os.strerror(err))
        fd = self._fd
        assert fd is not None
        try:
            os.ftruncate(fd, self._size)
        except OSError as e:
            self._abandon(e)
            self._fail(group, exc)
            return
        if not self._fsync:
            self._fail(group, exc)
            return

        def synced(_written: int, err2: int) -> None:
            if err2:
                self._abandon(OSError(err2, os.strerror(err2)))
            self._fail(group, exc)

        self._request(fd, [], 0, DATASYNC, synced)

    def _abandon(self, e: OSError) -> None:
        log.error(
            "cannot truncate segment %d after a failed write (%s): abandoning it", self._seg, e
        )
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

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
        if self._retry:  # a flush/close already waiting learns of it, as it would have
            for t in self._queue:
                if t.kind in (BARRIER, STOP) and t.error is None:
                    t.error = SpoolError("spool updates could not be written; will retry")
        if failed:
            self._notify(failed)

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
            except OSError as e:
                self._roll_failed(e)
                return
        if not self._fsync:
            self._rolled(fd, n, path, 0, 0)
            return
        assert self._dir_fd is not None
        self._request(self._dir_fd, [], 0, FULLSYNC, partial(self._rolled, fd, n, path))

    def _rolled(self, fd: int, n: int, path: str, _written: int, err: int) -> None:
        if err:
            os.close(fd)
            try:
                os.unlink(path)
            except OSError:
                pass
            self._roll_failed(OSError(err, os.strerror(err)))
            return
        self._fd, self._seg, self._size = fd, n, 0
        self._stats.segments_created += 1

    def _roll_failed(self, e: OSError) -> None:
        """No segment to write to: the record at the head fails (an UPDATE/DONE waits for a
        retry); a flush/close/delete at the head behind retried records is let through."""
        t = self._queue[0]
        if t.kind == RECORD:
            self._queue.popleft()
            self._fail([t], e)
        else:
            self._fail([], e)
            t.error = SpoolError("spool updates could not be written; will retry")

    def _delete(self, number: int) -> None:
        if number == self._seg and self._fd is not None:
            return  # defensive: never delete the segment being appended to
        try:
            os.unlink(os.path.join(self._dir, segment_name(number)))
        except FileNotFoundError:
            return
        except OSError as e:
            log.error("cannot delete segment %d: %s", number, e)
            return
        if not self._fsync:
            self._stats.segments_deleted += 1
            return

        def synced(_written: int, err: int) -> None:
            if err:  # in order: a later deletion never overtakes this one
                log.error("cannot delete segment %d: %s", number, os.strerror(err))
            else:
                self._stats.segments_deleted += 1

        assert self._dir_fd is not None
        self._request(self._dir_fd, [], 0, FULLSYNC, synced)

    def _stop(self) -> None:
        self._stopped = True
        for fd in (self._fd, self._dir_fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._dir_fd = None
        self._loop.remove_reader(self._io.done_fd)
        self._io.stop()
