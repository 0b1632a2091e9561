"""Record framing and segment files: functions, no threads, no asyncio.

A shard directory holds append-only segment files named `NNNNNNNN.seg` (decimal, increasing).
A segment is a sequence of records::

    header (16 bytes, little endian)
      magic     4s   b"FMR1"
      type      u8   RecordType
      flags     u8   0 (reserved)
      reserved  u16  0
      length    u32  payload length
      crc32     u32  zlib.crc32 of header bytes 4..12 (type, flags, reserved, length) + payload
    payload   `length` bytes

The crc also covers type and length, so a damaged header is caught like a damaged payload.
MESSAGE payload = u32 envelope length + msgpack Envelope + the message bytes, raw (wire form:
CRLF, dot-stuffed, without the final ".\\r\\n"), so delivery pwrite/preads them as they are.
A MOVE record has a MESSAGE payload: the copy of a live message that compaction took out of a
sparse older segment; it replaces the earlier copy (see Spool.compact).
"""

from __future__ import annotations

import enum
import errno as errno_mod
import os
import re
import struct
import zlib
from collections.abc import Sequence
from typing import Any

HEADER = struct.Struct("<4sBBHII")
HEADER_SIZE = HEADER.size  # 16
_HEADER_MID = struct.Struct("<BBHI")  # the crc-covered header fields
ENVLEN = struct.Struct("<I")
MAGIC = b"FMR1"
MAX_PAYLOAD = 0xFFFFFFFF  # u32 length field
_SEGMENT_RE = re.compile(r"^(\d{8,})\.seg$")
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024


class RecordType(enum.IntEnum):
    MESSAGE = 1  # Envelope + message bytes
    UPDATE = 2  # RecipientUpdate
    DONE = 3  # Done
    MOVE = 4  # as MESSAGE: a live message copied out of a sparse segment; replaces the old copy


def segment_name(number: int) -> str:
    """File name of segment `number`: 8 decimal digits + ".seg"."""
    return f"{number:08d}.seg"


def list_segments(directory: str | os.PathLike[str]) -> list[int]:
    """Numbers of the segment files in `directory`, ascending."""
    out = []
    for name in os.listdir(directory):
        m = _SEGMENT_RE.match(name)
        if m:
            out.append(int(m.group(1)))
    out.sort()
    return out


def frame(rtype: int, payload: Sequence[bytes | memoryview]) -> list[bytes | memoryview]:
    """Header + payload pieces of one record, ready for os.pwritev. Computes the crc (no copy)."""
    length = 0
    for p in payload:
        length += len(p)
    if length > MAX_PAYLOAD:
        raise ValueError(f"record payload of {length} bytes exceeds {MAX_PAYLOAD}")
    crc = zlib.crc32(_HEADER_MID.pack(rtype, 0, 0, length))
    for p in payload:
        crc = zlib.crc32(p, crc)
    return [HEADER.pack(MAGIC, rtype, 0, 0, length, crc), *payload]


def message_payload(
    envelope_bytes: bytes, data: Sequence[bytes | memoryview]
) -> list[bytes | memoryview]:
    """MESSAGE payload pieces: envelope length, envelope, message bytes (not copied)."""
    return [ENVLEN.pack(len(envelope_bytes)), envelope_bytes, *data]


def split_message(payload: memoryview) -> tuple[memoryview, int]:
    """(envelope bytes, offset of the message bytes within the payload) of a MESSAGE payload.

    Raises ValueError if the envelope length does not fit the payload.
    """
    if len(payload) < ENVLEN.size:
        raise ValueError("MESSAGE payload shorter than its envelope length field")
    (envlen,) = ENVLEN.unpack_from(payload)
    start = ENVLEN.size
    if start + envlen > len(payload):
        raise ValueError("MESSAGE envelope length exceeds the payload")
    return payload[start : start + envlen], start + envlen


def scan(buf: bytes | memoryview, start: int = 0) -> tuple[list[tuple[int, int, memoryview]], int]:
    """Parse the records of one segment's contents, from offset `start`.

    Returns ([(record offset, type, payload view), ...], good_end): the records up to the first
    one that is incomplete or damaged (bad magic, length beyond the end, crc mismatch), and the
    offset where that damaged record starts (== len(buf) when the rest of the segment is sound).
    Whether the damage is a torn tail or damage inside the file is salvage()'s question. No I/O.
    """
    mv = memoryview(buf)
    end = len(mv)
    pos = start
    records = []
    unpack = HEADER.unpack_from
    crc32 = zlib.crc32
    while pos + HEADER_SIZE <= end:
        magic, rtype, _flags, _res, length, crc = unpack(mv, pos)
        body = pos + HEADER_SIZE
        if magic != MAGIC or body + length > end:
            break
        payload = mv[body : body + length]
        if crc32(payload, crc32(mv[pos + 4 : pos + 12])) != crc:
            break
        records.append((pos, rtype, payload))
        pos = body + length
    return records, pos


def _sound_at(mv: memoryview, pos: int) -> tuple[bool, int]:
    """(whether a sound record starts at `pos`: magic, length within the buffer, crc; the bytes
    the crc check read, for salvage()'s budget)."""
    if pos + HEADER_SIZE > len(mv):
        return False, 0
    magic, _rtype, _flags, _res, length, crc = HEADER.unpack_from(mv, pos)
    body = pos + HEADER_SIZE
    if magic != MAGIC or body + length > len(mv):
        return False, 0
    ok = zlib.crc32(mv[body : body + length], zlib.crc32(mv[pos + 4 : pos + 12])) == crc
    return ok, HEADER_SIZE + length


def salvage(
    buf: bytes, budget: int | None = None
) -> tuple[list[tuple[int, int, memoryview]], list[tuple[int, int]], int]:
    """Parse one segment's contents like scan(), stepping over damage inside the file.

    Returns (records, damaged spans [(start, end)], good_end). A damaged record followed by no
    sound record is a torn tail: the writes of a batch never acknowledged (the writer
    fdatasyncs before acknowledging); good_end is where it starts (== len(buf) if there is
    none) and the caller truncates there. A damaged record followed by a sound one is damage
    inside the file (a bad sector, a flipped bit): acknowledged records follow it, so parsing
    resumes at the next sound record and [start, that record) is reported as a damaged span.

    The next sound record is first looked for where the damaged record's own header says it
    ends (a damaged payload leaves the header right), then at each later occurrence of the
    magic: a sound record is a magic, a length within the buffer and a matching crc. (A record
    forged inside a message body could pass for one, but only when the header of the very
    record holding it is the damaged part.) Bounded work: the candidates' crc checks cost at
    most `budget` bytes (default 8 x len(buf) + 1 MiB; real damage costs about 1 x); past it
    the search gives up and the rest is one damaged span reaching the end, so nothing after it
    is truncated as if it were a torn tail. No I/O.
    """
    mv = memoryview(buf)
    end = len(mv)
    if budget is None:
        budget = 8 * end + (1 << 20)
    records, pos = scan(mv)
    spans: list[tuple[int, int]] = []
    while pos < end:  # bounded: pos only grows
        nxt = -1
        if pos + HEADER_SIZE <= end:  # where the damaged record's header says it ends
            magic, _rtype, _flags, _res, length, _crc = HEADER.unpack_from(mv, pos)
            if magic == MAGIC:
                ok, work = _sound_at(mv, pos + HEADER_SIZE + length)
                budget -= work
                if ok:
                    nxt = pos + HEADER_SIZE + length
        at = pos + 1
        gave_up = False
        while nxt < 0:  # bounded: `at` only grows, and the budget only shrinks
            if budget <= 0:
                gave_up = True
                break
            at = buf.find(MAGIC, at)
            if at < 0:
                break
            ok, work = _sound_at(mv, at)
            budget -= work + 1
            if ok:
                nxt = at
            at += 1
        if nxt < 0:
            if gave_up:  # not known to be a torn tail: keep it
                spans.append((pos, end))
                pos = end
            break  # else nothing sound follows: a torn tail starts at pos
        spans.append((pos, nxt))
        more, pos = scan(mv, nxt)
        records += more
    return records, spans, pos


def write_all(fd: int, bufs: list[Any], offset: int) -> int:
    """pwritev all of `bufs` at `offset`, across IOV_MAX chunks and short writes. Returns bytes.

    `bufs` is consumed (modified in place). Empty buffers are skipped.
    """
    total = 0
    i = 0
    n_bufs = len(bufs)
    while i < n_bufs:
        if not len(bufs[i]):
            i += 1
            continue
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


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory so the entries created/renamed/removed in it are durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
