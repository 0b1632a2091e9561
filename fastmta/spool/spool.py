"""Spool: the durable, append-only, group-committed message store of one shard.

Threading contract: the event loop owns the Spool; every method is called from the loop thread.
The segment writer (writer.py) runs on the loop too, but every segment write and fsync runs on
its I/O thread (iothread.py); recovery and adoption file I/O run via asyncio.to_thread. On the
loop thread the spool only creates, deletes and truncates segment files and preads message bytes.

Durability contract:
- store() returns only after the message and its envelope are fdatasync'd (and, for a new
  segment file, its directory entry fsync'd). It raises SpoolError otherwise; a failed store is
  truncated away and is never recovered later (best effort if even the truncation fails: the
  record is then whole, never half).
- update()/done() are written with the next group commit (lazily durable); flush() waits for
  them; close() writes them before returning. Losing a DONE in a crash means re-delivery
  (at-least-once); a stored MESSAGE is never lost.
- If a store() is cancelled after it was submitted, the message may still be stored: it is then
  live in the spool (and returned by the next open()) although the caller never saw it.
"""

from __future__ import annotations

import asyncio
import bisect
import fcntl
import logging
import os
from collections.abc import AsyncIterator, Callable, Sequence

from .errors import SpoolError
from .inject import INCOMING, claim_incoming, unlink_claimed
from .parked import (
    LOADING,
    PARKED,
    PENDING,
    ParkedFile,
    envelopes,
    list_parked,
    read_parked,
    remove_parked,
    rename_parked,
    rewrite_parked,
    settle,
    write_parked,
)
from .records import ENCODER, Done, Envelope, RecipientUpdate, StoredMessage
from .recover import SegmentInfo, record_bytes, recover
from .segment import ENVLEN, HEADER_SIZE, RecordType, message_payload, segment_name
from .writer import BARRIER, DELETE, RECORD, STOP, SegmentWriter, SpoolStats, Ticket

__all__ = ["Spool", "SpoolStats"]

log = logging.getLogger("fastmta.spool")


def _read_messages(directory: str, where: list[tuple[int, int, int]]) -> list[bytes | None]:
    """(segment, offset, length) -> the bytes there, or None if the segment is gone or short.
    Blocking: runs in a worker thread (Spool.compact)."""
    out: list[bytes | None] = []
    fds: dict[int, int | None] = {}
    try:
        for seg, offset, length in where:
            if seg not in fds:
                try:
                    fds[seg] = os.open(os.path.join(directory, segment_name(seg)), os.O_RDONLY)
                except FileNotFoundError:
                    fds[seg] = None
            fd = fds[seg]
            data = os.pread(fd, length, offset) if fd is not None else None
            out.append(data if data is not None and len(data) == length else None)
    finally:
        for fd in fds.values():
            if fd is not None:
                os.close(fd)
    return out


def _read_messages_at(path: str, offset: int, length: int) -> bytes | None:
    """``length`` bytes at ``offset`` of ``path``, or None if it is gone or short. Blocking."""
    try:
        with open(path, "rb") as f:
            data = os.pread(f.fileno(), length, offset)
    except FileNotFoundError:
        return None
    return data if len(data) == length else None


class Spool:
    """Durable message store for one shard directory (see the module docstring for contracts).

    directory        the shard directory (created if missing); holds NNNNNNNN.seg, lock, adopting/
    fsync            False only for tests/benchmarks: nothing is then durable
    segment_size     roll over to a new segment file past this size (a bigger record gets its own)
    max_batch_bytes  upper bound of one group commit's payload
    incoming         injection directory shared by the shards of one spool root
                     (default `<directory>/incoming`, i.e. the shard is the root)
    adopt_batch      max injected messages adopted per adopt_incoming() call (bounds memory)
    commit_delay     under load, wait this long before a group commit so more records share
                     one fdatasync (see writer.BUSY_WINDOW); 0 syncs at once
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        fsync: bool = True,
        segment_size: int = 64 << 20,
        max_batch_bytes: int = 8 << 20,
        incoming: str | os.PathLike[str] | None = None,
        adopt_batch: int = 1000,
        commit_delay: float = 0.0,
    ) -> None:
        self.directory = os.fspath(directory)
        self.incoming = os.fspath(incoming) if incoming is not None else None
        if self.incoming is None:
            self.incoming = os.path.join(self.directory, INCOMING)
        self._fsync = fsync
        self._segment_size = segment_size
        self._max_batch = max_batch_bytes
        self._adopt_batch = adopt_batch
        self._commit_delay = commit_delay
        self.stats = SpoolStats()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writer: SegmentWriter | None = None
        self._lock_fd: int | None = None
        self._index: dict[str, StoredMessage] = {}
        self._segs: dict[int, SegmentInfo] = {}
        self._active = 0  # highest segment number the writer may append to (loop's view)
        self._readers: dict[int, int] = {}  # segment number -> O_RDONLY fd
        self._adopting: asyncio.Lock | None = None
        self._closing = False
        self._moving: set[str] = set()  # queue ids with a MOVE record in flight (compact)
        self._done_while_moving: set[str] = set()  # their DONE waits for the MOVE (see _moved)
        self._compacting = False
        self._parked: list[ParkedFile] = []  # parked/ files, earliest due first (parked.py)
        self.parked_count = 0  # messages in them
        self._parked_lock: asyncio.Lock | None = None  # one parked-file operation at a time

    # --- lifecycle ----------------------------------------------------------------------------
    async def open(self, adopt: bool = True) -> list[StoredMessage]:
        """Create directories, lock the shard, recover, start the writer, adopt injected mail
        (unless ``adopt`` is false: the caller then calls adopt_incoming() itself, and knows
        which messages arrived that way).

        Returns every live (not DONE) message, in arrival order, with updates applied.
        Raises SpoolError if another process holds the shard.
        """
        if self._writer is not None:
            raise SpoolError("spool already open")
        self._loop = asyncio.get_running_loop()
        self._adopting = asyncio.Lock()
        self._parked_lock = asyncio.Lock()
        os.makedirs(self.directory, exist_ok=True)
        self._lock()
        try:
            rec = await asyncio.to_thread(recover, self.directory, fsync=self._fsync)
            await asyncio.to_thread(settle, self.directory, rec.messages, fsync=self._fsync)
            self._parked = await asyncio.to_thread(list_parked, self.directory)
            self.parked_count = sum(pf.count for pf in self._parked)
        except BaseException:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise
        self._index = rec.messages
        self._segs = rec.segments
        self._active = rec.next_segment
        self.stats.truncated_bytes += rec.truncated_bytes
        self.stats.damaged_bytes += rec.damaged_bytes
        self.stats.recovered = len(rec.messages)
        self._writer = SegmentWriter(
            self.directory,
            rec.next_segment,
            self._complete,
            self.stats,
            fsync=self._fsync,
            segment_size=self._segment_size,
            max_batch_bytes=self._max_batch,
            commit_delay=self._commit_delay,
        )
        self._writer.start()
        for n in sorted(self._segs):
            self._maybe_delete(n)
        try:
            if adopt:
                await self.adopt_incoming()
        except OSError as e:  # injected mail waits for the next adoption; the spool works
            log.error("adopting injected messages failed: %s", e)
        out = list(self._index.values())
        out.sort(key=lambda m: (m.envelope.arrival, m.envelope.id))
        return out

    async def close(self) -> None:
        """Write everything queued (updates/done included), stop the writer, release the shard."""
        writer = self._writer
        if writer is None or self._closing:
            return
        self._closing = True  # from here on every write raises SpoolError instead of hanging
        fut = self._loop.create_future()
        writer.submit(Ticket(STOP, fut=fut))
        try:
            await fut
        except SpoolError:
            pass  # logged by the writer; nothing more can be done at close
        finally:
            await asyncio.to_thread(writer.join)
            self._writer = None
            self._closing = False
            for fd in self._readers.values():
                os.close(fd)
            self._readers.clear()
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    # --- the API ------------------------------------------------------------------------------
    async def store(self, envelope: Envelope, data: bytes | Sequence[bytes]) -> StoredMessage:
        """Durably store a message; returns where it is. Sets `envelope.size`.

        `data` is wire form (CRLF, dot-stuffed, no final ".\\r\\n"), one bytes object or a list
        of chunks (written with writev, not joined). Do not mutate it until this returns.
        Raises SpoolError (answer 452 4.3.1) if it could not be made durable.
        """
        return await self.start_store(envelope, data)

    def start_store(
        self, envelope: Envelope, data: bytes | Sequence[bytes]
    ) -> asyncio.Future[StoredMessage]:
        """store() without the coroutine, for callers on the hot path (the SMTP listener).

        Returns a future that resolves to the StoredMessage once it is durable, or fails with
        SpoolError; raises SpoolError at once if the spool is not open.
        """
        writer = self._live_writer()
        pieces = [data] if isinstance(data, bytes | bytearray | memoryview) else list(data)
        size = 0
        for p in pieces:
            size += len(p)
        envelope.size = size
        env_bytes = ENCODER.encode(envelope)
        payload = message_payload(env_bytes, pieces)
        fut = self._loop.create_future()
        ctx = (envelope, len(env_bytes), size)
        writer.submit(
            Ticket(
                RECORD, RecordType.MESSAGE, payload, ENVLEN.size + len(env_bytes) + size, fut, ctx
            )
        )
        return fut

    def read(self, msg: StoredMessage) -> bytes:
        """The stored wire-form bytes of `msg` (one os.pread; fine on the loop for mail sizes).

        Raises SpoolError if the message's segment is gone (it was DONE) or is short.
        """
        fd = self._readers.get(msg.segment)
        if fd is None:
            if msg.segment not in self._segs:
                raise SpoolError(f"message {msg.envelope.id} is no longer in the spool")
            path = os.path.join(self.directory, segment_name(msg.segment))
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                raise SpoolError(f"cannot open {path}: {e}", e.errno) from e
            self._readers[msg.segment] = fd
        data = os.pread(fd, msg.length, msg.offset)
        if len(data) != msg.length:
            raise SpoolError(f"message {msg.envelope.id}: short read")
        return data

    async def update(self, envelope: Envelope) -> None:
        """Record the recipient states, last replies, attempts and next_attempt of `envelope`.

        Written with the next group commit (see flush()). Raises KeyError for an unknown or
        finished queue id. The spool's own copy of the envelope is updated too.
        """
        self._live_writer()
        sm = self._index[envelope.id]
        upd = RecipientUpdate.of(envelope)
        if sm.envelope is not envelope:
            upd.apply(sm.envelope)
        self._submit_record(RecordType.UPDATE, ENCODER.encode(upd), sm.segment)

    async def done(self, queue_id: str) -> None:
        """Mark a message finished (every recipient final). Idempotent: unknown ids are ignored.

        Written with the next group commit; the message's segment is deleted once its last
        live message is done (and no older segment still needs its DONE records).
        """
        self._live_writer()
        sm = self._index.pop(queue_id, None)
        if sm is None:
            return
        self._segs[sm.segment].remove(record_bytes(sm))
        if queue_id in self._moving:
            self._done_while_moving.add(queue_id)  # written after the MOVE record (_moved)
        else:
            self._submit_done(queue_id, sm.segment)
        self._maybe_delete(sm.segment)

    async def compact(self, below: float = 0.25, max_bytes: int = 16 << 20) -> int:
        """Copy the live messages out of sparse sealed segments, so those can be deleted.

        A segment is kept while any message in it is live, so a few long-deferred messages
        would otherwise pin whole segments (64 MiB each by default) for up to the queue
        lifetime. A sealed segment whose live messages take less than ``below`` of its bytes
        has them copied into the active segment as MOVE records (oldest segments first, at
        most ``max_bytes`` of messages per call); the old copies then count as gone and the
        segment is deleted like any other. Returns the number of messages moved.

        Crash safety: a MOVE replaces the earlier copy at recovery, and the segment holding
        it refers to the old segment, so it is never deleted before the old copy is.
        """
        self._live_writer()
        if self._compacting:
            return 0
        self._compacting = True
        try:
            return await self._compact(below, max_bytes)
        finally:
            self._compacting = False

    async def _compact(self, below: float, max_bytes: int) -> int:
        sparse = sorted(
            n
            for n, info in self._segs.items()
            if n < self._active and info.live > 0 and info.live_bytes < below * info.size
        )
        if not sparse:
            return 0
        chosen: set[int] = set()
        budget = 0
        for n in sparse:
            chosen.add(n)
            budget += self._segs[n].live_bytes
            if budget >= max_bytes:
                break
        todo: list[StoredMessage] = []
        size = 0
        for i, sm in enumerate(list(self._index.values())):
            if i % 10_000 == 9_999:
                await asyncio.sleep(0)  # a big index: let the sessions run
            if sm.segment in chosen and size < max_bytes and sm.envelope.id not in self._moving:
                todo.append(sm)
                size += sm.length
        # Old segments are rarely in the page cache: read them in a thread, with its own fds.
        where = [(sm.segment, sm.offset, sm.length) for sm in todo]
        datas = await asyncio.to_thread(_read_messages, self.directory, where)
        moves = []
        for sm, data, (seg, _, _) in zip(todo, datas, where, strict=True):
            qid = sm.envelope.id
            if data is None or self._index.get(qid) is not sm or sm.segment != seg:
                continue  # finished (or moved) while we read
            if qid in self._moving or self._writer is None or self._closing:
                continue
            moves.append((sm, self._submit_move(sm, data)))
        moved = 0
        for sm, fut in moves:
            try:
                await fut
                moved += 1
            except SpoolError as e:  # the message stays where it was (see _move_failed)
                log.error("moving %s out of segment %d failed: %s", sm.envelope.id, sm.segment, e)
        return moved

    async def flush(self) -> None:
        """Wait until every record submitted so far (updates and done included) is durable."""
        writer = self._live_writer()
        fut = self._loop.create_future()
        writer.submit(Ticket(BARRIER, fut=fut))
        await fut

    async def adopt_incoming(self) -> list[StoredMessage]:
        """Adopt messages injected with inject() into this shard's log. Async.

        Claims up to `adopt_batch` files (rename-to-claim, safe against other shards and
        processes), stores them durably (group commit), then deletes the claimed files.
        Returns the newly stored messages (for the caller to schedule). A message whose store
        fails stays claimed and is retried by the next call.
        """
        self._live_writer()
        async with self._adopting:  # one adoption at a time per spool
            claimed = await asyncio.to_thread(
                claim_incoming, self.incoming, self.directory, self._adopt_batch, fsync=self._fsync
            )
            if not claimed:
                return []
            todo = []
            finished = []
            for path, env, data in claimed:
                if env.id in self._index:
                    finished.append(path)  # stored before a crash, unlink lost: not twice
                else:
                    todo.append((path, env, data))
            results = await self._store_each([(env, data) for _, env, data in todo])
            adopted = []
            for (path, _, _), sm in zip(todo, results, strict=True):
                if sm is not None:
                    adopted.append(sm)
                    finished.append(path)
            self.stats.adopted += len(adopted)
            await asyncio.to_thread(unlink_claimed, finished, self.directory, fsync=self._fsync)
            return adopted

    async def _store_each(self, items: list[tuple[Envelope, bytes]]) -> list[StoredMessage | None]:
        """store() every (envelope, data) at once (they share group commits); None where the
        store failed (the caller keeps that one where it was)."""
        results = await asyncio.gather(
            *(self.store(env, data) for env, data in items), return_exceptions=True
        )
        return [None if isinstance(r, BaseException) else r for r in results]

    # --- parked messages (parked.py): the part of a big queue kept out of memory ---------------
    @property
    def next_parked(self) -> ParkedFile | None:
        """The parked file due first, or None."""
        return self._parked[0] if self._parked else None

    async def park(self, msgs: Sequence[StoredMessage]) -> ParkedFile | None:
        """Move live messages (not being delivered) out of the log and out of memory into one
        parked file: their bytes are read, written with their current envelopes (fsync'd),
        then they are DONE here. Returns the file (None if none of them is live any more).
        Raises SpoolError; the messages then stay live here.

        The caller must not change these messages until this returns. The file counts only
        once the DONE records are durable (it is written as ``.pending`` until then), so a
        crash leaves each message in the log or parked, never both (parked.settle).
        """
        self._live_writer()
        async with self._parked_lock:  # type: ignore[union-attr]
            msgs = [sm for sm in msgs if self._index.get(sm.envelope.id) is sm]
            if not msgs:
                return None  # deleted meanwhile
            where = [(sm.segment, sm.offset, sm.length) for sm in msgs]
            datas = await asyncio.to_thread(_read_messages, self.directory, where)
            items = []
            for sm, data in zip(msgs, datas, strict=True):
                # A segment compacted away while we read: the message is elsewhere now.
                items.append((sm.envelope, data if data is not None else self.read(sm)))
            try:
                pf = await asyncio.to_thread(
                    write_parked, self.directory, items, fsync=self._fsync, suffix=PENDING
                )
            except OSError as e:
                raise SpoolError(f"parking {len(items)} messages failed: {e}", e.errno) from e
            for sm in msgs:
                await self.done(sm.envelope.id)
            try:
                await self.flush()  # the DONE records are durable: now the file may count
            except SpoolError as e:  # maybe in both places after a crash: at least once
                log.error("parking %s: the log could not be synced: %s", pf.name, e)
            try:
                await asyncio.to_thread(
                    rename_parked, self.directory, pf.name + PENDING, pf.name, fsync=self._fsync
                )
            except OSError as e:  # out of the log: the next open() settles the file
                log.error("parking %s: %s", pf.name, e)
                return None
            self._add_parked(pf)
            self.stats.parked += len(msgs)
            return pf

    async def unpark(self, pf: ParkedFile) -> list[StoredMessage]:
        """Load a parked file back: its messages are stored in the log again (with their state,
        group commit), then the file is deleted (it is ``.loading`` meanwhile, for
        parked.settle after a crash). Returns them (a queue id already live here is skipped).
        Raises SpoolError when none could be stored; those not stored are parked again."""
        self._live_writer()
        async with self._parked_lock:  # type: ignore[union-attr]
            if pf not in self._parked:
                return []
            loading = pf.name + LOADING
            try:
                await asyncio.to_thread(
                    rename_parked, self.directory, pf.name, loading, fsync=self._fsync
                )
            except OSError as e:
                raise SpoolError(f"loading parked file {pf.name}: {e}", e.errno) from e
            self._drop_parked(pf)
            items = await asyncio.to_thread(read_parked, self.directory, loading)
            todo = [(env, data) for env, data in items or () if env.id not in self._index]
            results = await self._store_each(todo)
            stored = [sm for sm in results if sm is not None]
            failed = [item for item, sm in zip(todo, results, strict=True) if sm is None]
            try:
                if failed:  # parked again, without the ones now in the log
                    self._add_parked(
                        await asyncio.to_thread(
                            write_parked, self.directory, failed, fsync=self._fsync
                        )
                    )
                await asyncio.to_thread(remove_parked, self.directory, loading, fsync=self._fsync)
            except OSError as e:  # the next open() settles it: nothing twice, nothing lost
                log.error("parked file %s: %s", loading, e)
            if failed and not stored:
                raise SpoolError(f"loading parked file {pf.name} failed")
            self.stats.unparked += len(stored)
            return stored

    async def change_parked(
        self, change: Callable[[Envelope], bool | None], only: set[str] | None = None
    ) -> list[str]:
        """Apply an operator change to the parked messages (every one, or those whose queue id
        is in ``only``): ``change(env)`` returns True (changed), False (not) or None (delete).
        Rewrites the files concerned (in a thread; with ``only``, the others' envelopes are
        only read); returns the queue ids changed or deleted."""
        self._live_writer()
        touched: list[str] = []
        if only is not None and not only:
            return touched

        def pick(env: Envelope) -> bool | None:
            return change(env) if only is None or env.id in only else False

        async with self._parked_lock:  # type: ignore[union-attr]
            for pf in list(self._parked):
                if only is not None:  # rewrite only the files that hold a named message
                    inside = await asyncio.to_thread(envelopes, self.directory, pf.name)
                    if all(env.id not in only for env, _, _ in inside):
                        continue
                try:
                    new, ids = await asyncio.to_thread(
                        rewrite_parked, self.directory, pf.name, pick, fsync=self._fsync
                    )
                except OSError as e:
                    raise SpoolError(f"changing parked file {pf.name}: {e}", e.errno) from e
                if new != pf:
                    self._drop_parked(pf)
                    if new is not None:
                        self._add_parked(new)
                touched += ids
        return touched

    async def parked_messages(self) -> AsyncIterator[Envelope]:
        """The envelopes of the parked messages, file by file, read in a thread: memory holds
        one file at a time."""
        for pf in list(self._parked):
            for env, _, _ in await asyncio.to_thread(envelopes, self.directory, pf.name):
                yield env

    async def parked_message(self, queue_id: str) -> tuple[Envelope, bytes] | None:
        """One parked message (envelope, wire bytes) by queue id, or None. Reads the parked
        files until it is found."""
        for pf in list(self._parked):
            items = await asyncio.to_thread(envelopes, self.directory, pf.name)
            for env, offset, length in items:
                if env.id == queue_id:
                    path = os.path.join(self.directory, PARKED, pf.name)
                    data = await asyncio.to_thread(_read_messages_at, path, offset, length)
                    return None if data is None else (env, data)
        return None

    def _add_parked(self, pf: ParkedFile) -> None:
        bisect.insort(self._parked, pf)
        self.parked_count += pf.count

    def _drop_parked(self, pf: ParkedFile) -> None:
        self._parked.remove(pf)
        self.parked_count -= pf.count

    def get(self, queue_id: str) -> StoredMessage | None:
        """The live message with this queue id, or None."""
        return self._index.get(queue_id)

    def __len__(self) -> int:
        """Number of live messages."""
        return len(self._index)

    # --- internals (loop thread) --------------------------------------------------------------
    def _lock(self) -> None:
        fd = os.open(
            os.path.join(self.directory, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
        )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            raise SpoolError(f"spool {self.directory} is in use by another process", e.errno) from e
        self._lock_fd = fd

    def _live_writer(self) -> SegmentWriter:
        if self._writer is None or self._closing:
            raise SpoolError("spool is not open")
        return self._writer

    def _submit_record(self, rtype: int, body: bytes, ref_segment: int) -> None:
        self._live_writer().submit(Ticket(RECORD, rtype, [body], len(body), None, ref_segment))

    def _submit_done(self, queue_id: str, ref_segment: int) -> None:
        self._submit_record(RecordType.DONE, ENCODER.encode(Done(queue_id)), ref_segment)

    def _submit_move(self, sm: StoredMessage, data: bytes) -> asyncio.Future[None]:
        env = sm.envelope
        env_bytes = ENCODER.encode(env)
        payload = message_payload(env_bytes, [data])
        fut = self._loop.create_future()
        size = ENVLEN.size + len(env_bytes) + len(data)
        writer = self._live_writer()
        self._moving.add(env.id)
        writer.submit(Ticket(RECORD, RecordType.MOVE, payload, size, fut, (len(env_bytes), sm)))
        return fut

    def _move_failed(self, sm: StoredMessage) -> None:
        """A MOVE record could not be written: the message stays in its old segment."""
        qid = sm.envelope.id
        self._moving.discard(qid)
        if qid in self._done_while_moving:
            self._done_while_moving.discard(qid)
            self._submit_done(qid, sm.segment)

    def _moved(self, sm: StoredMessage, seg: int, record_offset: int, offset: int) -> None:
        """A MOVE record of ``sm`` is durable in ``seg``: the message lives there now."""
        qid = sm.envelope.id
        self._moving.discard(qid)
        self.stats.moved += 1
        old = sm.segment
        info = self._segs[seg]
        if old != seg:
            info.refs.add(old)  # the old copy must not outlive this one (it would come back)
        if qid in self._done_while_moving:  # finished meanwhile: done() fixed the counts
            self._done_while_moving.discard(qid)
            self._submit_done(qid, seg)
            return
        old_info = self._segs.get(old)
        if old_info is not None:
            old_info.remove(record_bytes(sm))
        sm.segment, sm.offset, sm.record_offset = seg, offset, record_offset
        info.add(record_bytes(sm))
        self._maybe_delete(old)

    def _complete(self, tickets: list[Ticket]) -> None:
        for t in tickets:
            fut = t.fut
            if t.kind != RECORD:
                if fut is not None and not fut.done():
                    if t.error is not None:
                        fut.set_exception(t.error)
                    else:
                        fut.set_result(None)
                continue
            if t.error is not None:
                if t.rtype == RecordType.MOVE:
                    self._move_failed(t.ctx[1])
                if not fut.done():
                    fut.set_exception(t.error)
                continue
            seg = t.segment
            info = self._segs.get(seg)
            if info is None:
                info = self._segs[seg] = SegmentInfo()
            end = t.offset + HEADER_SIZE + t.size
            if end > info.size:
                info.size = end
            if seg > self._active:
                self._rolled(seg)
            if t.rtype == RecordType.MESSAGE:
                env, envlen, size = t.ctx
                offset = t.offset + HEADER_SIZE + ENVLEN.size + envlen
                sm = StoredMessage(env, seg, offset, size, t.offset)
                self._index[env.id] = sm
                info.add(end - t.offset)
                self.stats.messages += 1
                if not fut.done():
                    fut.set_result(sm)
            elif t.rtype == RecordType.MOVE:
                envlen, sm = t.ctx
                self._moved(sm, seg, t.offset, t.offset + HEADER_SIZE + ENVLEN.size + envlen)
                if not fut.done():
                    fut.set_result(None)
            else:
                ref = t.ctx
                if ref != seg and ref in self._segs:
                    self._segs[seg].refs.add(ref)

    def _rolled(self, new_active: int) -> None:
        """The writer moved on to `new_active`: older segments may now be deletable."""
        self._active = new_active
        for n in sorted(self._segs):
            if n >= new_active:
                break
            self._maybe_delete(n)

    def _maybe_delete(self, n: int) -> None:
        info = self._segs.get(n)
        if info is None or n >= self._active or info.live > 0 or self._closing:
            return  # (when closing, the next open() deletes it)
        if any(r in self._segs for r in info.refs):
            return
        del self._segs[n]
        fd = self._readers.pop(n, None)
        if fd is not None:
            os.close(fd)
        self._writer.submit(Ticket(DELETE, ctx=n))
        for m in sorted(self._segs):
            if m > n and n in self._segs[m].refs:
                self._segs[m].refs.discard(n)
                self._maybe_delete(m)
