"""Recovery: rebuild the live-message index of a shard directory from its segments.

Blocking file I/O: Spool.open() runs it in a worker thread, never on the event loop.
"""

from __future__ import annotations

import logging
import os

import msgspec

from .records import DONE_DECODER, ENVELOPE_DECODER, UPDATE_DECODER, StoredMessage
from .segment import (
    HEADER,
    HEADER_SIZE,
    MAGIC,
    RecordType,
    list_segments,
    salvage,
    segment_name,
    split_message,
)

log = logging.getLogger("fastmta.spool")


class SegmentInfo:
    """Bookkeeping for one segment: how many of its messages are live (and their bytes), its
    size, and which OLDER segments its UPDATE/DONE/MOVE records refer to. A segment may be
    deleted only when it has no live message and none of the segments it refers to still
    exists; otherwise deleting its DONE (or MOVE) records would bring finished (or stale)
    messages back at the next recovery. ``live_bytes`` / ``size`` tells compaction how sparse
    it is."""

    __slots__ = ("live", "live_bytes", "refs", "size")

    def __init__(self) -> None:
        self.live = 0
        self.live_bytes = 0  # record bytes of the live messages
        self.size = 0  # bytes of records in the file
        self.refs: set[int] = set()

    def add(self, record_bytes: int) -> None:
        self.live += 1
        self.live_bytes += record_bytes

    def remove(self, record_bytes: int) -> None:
        self.live -= 1
        self.live_bytes -= record_bytes


def record_bytes(sm: StoredMessage) -> int:
    """Bytes of the MESSAGE/MOVE record holding ``sm`` (header to end of the message)."""
    return sm.offset - sm.record_offset + sm.length


class Recovered:
    """What recover() found: live messages by queue id, segment bookkeeping, next segment."""

    def __init__(self) -> None:
        self.messages: dict[str, StoredMessage] = {}
        self.segments: dict[int, SegmentInfo] = {}
        self.next_segment = 1
        self.truncated_bytes = 0
        self.damaged_bytes = 0  # inside segments, skipped (not truncated: sound records follow)
        self.skipped_records = 0


_LOSS = {
    RecordType.MESSAGE: "that message (it is not delivered)",
    RecordType.MOVE: "that copy of a moved message (its older copy is used if still there)",
    RecordType.UPDATE: "that state change (the message keeps its last good state)",
    RecordType.DONE: "that message's completion (it will be delivered again)",
}


def salvage_whole(buf: bytes, what: str) -> tuple[list, list[tuple[int, int]]]:
    """The sound records of a file that was written whole and fsync'd before it was renamed
    into place (a parked or injected file: it has no torn tail, so anything unsound is damage)
    and its damaged spans, each logged naming ``what`` (the file)."""
    records, spans, good = salvage(buf)
    if good < len(buf):
        spans.append((good, len(buf)))
    for start, end in spans:
        log.error(
            "%s: %d damaged bytes at offset %d skipped; lost: %s",
            what, end - start, start, describe_damage(buf, start, end),
        )  # fmt: skip
    return records, spans


def describe_damage(buf: bytes, start: int, end: int) -> str:
    """What the damaged bytes [start, end) held, as far as their unverified header and payload
    tell (for the log): record type, queue id if it decodes, and what losing it means."""
    if end - start < HEADER_SIZE:
        return "part of a record header"
    magic, rtype, _flags, _res, length, _crc = HEADER.unpack_from(buf, start)
    if magic != MAGIC or rtype not in _LOSS:
        return "a record with a damaged header (type unknown)"
    kind = RecordType(rtype)
    payload = memoryview(buf)[start + HEADER_SIZE : min(end, start + HEADER_SIZE + length)]
    try:  # best effort: the bytes failed their crc
        if kind == RecordType.MESSAGE or kind == RecordType.MOVE:
            qid = ENVELOPE_DECODER.decode(split_message(payload)[0]).id
        elif kind == RecordType.UPDATE:
            qid = UPDATE_DECODER.decode(payload).id
        else:
            qid = DONE_DECODER.decode(payload).id
        what = f"queue id {qid} (unverified)"
    except (msgspec.DecodeError, ValueError):
        what = "queue id unreadable"
    more = end - start - HEADER_SIZE - length
    rest = f", and {more} more damaged bytes" if more > 0 else ""
    return f"a {kind.name} record, {what}: {_LOSS[kind]}{rest}"


def _keep_aside(path: str, buf: bytes, start: int, end: int) -> str:
    """Copy the damaged bytes to ``<path>.corrupt-<start>`` for an operator to salvage by hand
    (the segment itself is deleted in time, once its live messages are done). Returns the
    log's note. A failure to copy does not stop recovery."""
    aside = f"{path}.corrupt-{start}"
    try:
        with open(aside, "xb") as f:  # a second recovery finds it there already
            f.write(buf[start:end])
    except FileExistsError:
        pass
    except OSError as e:
        return f" (copying them aside failed: {e})"
    return f"; the damaged bytes are kept in {aside}"


def recover(directory: str, *, fsync: bool = True, readonly: bool = False) -> Recovered:
    """Scan every segment in order and replay MESSAGE / UPDATE / DONE records.

    A torn tail (bad magic, length or crc, and no sound record after it) is truncated away on
    disk: those records were never acknowledged (the writer fdatasyncs before acknowledging),
    so no acknowledged message is lost and the torn one is never delivered half. A damaged
    record with sound records after it is damage inside the file (segment.salvage): it is
    skipped and logged, its bytes are copied aside (``<segment>.corrupt-<offset>``) and the
    segment is left as it is, so the acknowledged records after it still count. What the
    damaged record held is lost, as it cannot be trusted: a MESSAGE is not delivered (its
    later records find no message and are ignored), a lost UPDATE leaves its message at its
    last good state and a lost DONE brings it back (delivered again: at-least-once). Unknown
    record types (from a newer fastmta) and records that do not decode are skipped and logged.

    ``readonly`` (for `fastmta queue list` beside a running server): nothing on disk changes,
    a torn tail is only skipped, and a segment deleted since it was listed is ignored.
    """
    res = Recovered()
    index = res.messages
    segs = res.segments
    numbers = list_segments(directory)
    for n in numbers:
        path = os.path.join(directory, segment_name(n))
        try:
            with open(path, "rb") as f:
                buf = f.read()
        except FileNotFoundError:
            if not readonly:
                raise
            continue
        records, damaged, good = salvage(buf)
        for start, end in damaged:  # never cut away: sound, acknowledged records follow
            res.skipped_records += 1
            res.damaged_bytes += end - start
            kept = "" if readonly else _keep_aside(path, buf, start, end)
            resumes = f"resumes at {end}" if end < len(buf) else "gave up its search to the end"
            log.error(
                "segment %s: %d damaged bytes at offset %d skipped, recovery %s; lost: %s%s",
                path, end - start, start, resumes, describe_damage(buf, start, end), kept,
            )  # fmt: skip
        if good < len(buf) and not readonly:
            log.warning(
                "segment %s: torn tail of %d bytes at %d cut off", path, len(buf) - good, good
            )
            res.truncated_bytes += len(buf) - good
            with open(path, "r+b") as f:
                f.truncate(good)
                if fsync:
                    os.fdatasync(f.fileno())
        info = segs[n] = SegmentInfo()
        info.size = good
        for off, rtype, payload in records:
            try:
                if rtype == RecordType.MESSAGE or rtype == RecordType.MOVE:
                    env_bytes, data_at = split_message(payload)
                    env = ENVELOPE_DECODER.decode(env_bytes).share_strings()
                    old = index.get(env.id)
                    if old is not None:
                        if rtype == RecordType.MESSAGE:
                            continue  # a duplicate (adoption crash window): keep the first copy
                        segs[old.segment].remove(record_bytes(old))  # moved: the copy wins
                        if old.segment != n:
                            info.refs.add(old.segment)
                    length = len(payload) - data_at
                    sm = StoredMessage(env, n, off + HEADER_SIZE + data_at, length, off)
                    index[env.id] = sm
                    info.add(record_bytes(sm))
                elif rtype == RecordType.UPDATE:
                    upd = UPDATE_DECODER.decode(payload)
                    sm = index.get(upd.id)
                    if sm is not None:
                        upd.apply(sm.envelope)
                        if sm.segment != n:
                            info.refs.add(sm.segment)
                elif rtype == RecordType.DONE:
                    done = DONE_DECODER.decode(payload)
                    sm = index.pop(done.id, None)
                    if sm is not None:
                        segs[sm.segment].remove(record_bytes(sm))
                        if sm.segment != n:
                            info.refs.add(sm.segment)
                else:
                    res.skipped_records += 1
            except (msgspec.DecodeError, ValueError) as e:
                res.skipped_records += 1
                log.error("segment %s: record at %d skipped: %s", path, off, e)
        del records, buf
    if numbers:
        res.next_segment = numbers[-1] + 1
    return res
