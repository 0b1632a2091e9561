"""Parked messages: the on-disk part of a queue too big for memory. Blocking file I/O only.

A worker keeps at most ``queue.max_resident`` queued messages in memory (their envelopes, for
scheduling). Beyond that, whole batches of not-yet-due (or held) messages are *parked*: each
batch becomes one file in ``<shard>/parked/``, a sequence of MESSAGE records (segment.py
framing) holding the envelope with its current state and the wire-form bytes, so a file is
self-contained and the log segments they came from can be compacted away. The file name
carries what scheduling needs, so listing the directory is enough to know when to load a
file back, and memory per parked message is zero:

    <due in ms since the epoch, 13 digits>-<message count, 6 digits>-<first queue id>.park

``due`` is the earliest next attempt among the file's messages that are not on hold
(``HELD_DUE`` when all are held: such a file is loaded only when an operator releases one).
This is Postfix's deferred queue (files on disk, scanned when due; only the active queue in
memory) done in batches, so a file costs one fsync for up to ``queue.park_batch`` messages.

Writing: ``.<name>.tmp``, fsync, rename, fsync the directory. A crashed write leaves only a
tmp file, deleted by :func:`list_parked`. A damaged file (it can only be damaged by the disk:
writes are renamed into place after their fsync) costs only its damaged records: every sound
record is still loaded (segment.salvage), each damaged span is logged and the file is renamed
to ``*.bad`` for the operator, so nothing is silently deleted.

A message is live in the log or parked, never both, also across a crash. Spool.park writes
the file as ``<name>.pending``, makes the DONE records of its messages durable, then renames
it to ``<name>``; Spool.unpark renames ``<name>`` to ``<name>.loading`` before it stores the
messages back into the log, and deletes it after. A crash leaves at most such a file, and
:func:`settle` (run by Spool.open after recovery) keeps in it exactly the messages that are
not live in the log. An operator's change that renames a file (rewrite_parked) goes through
``<new>.replacing.<old>`` the same way, so no message is ever parked twice either.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Container, Iterable, Sequence
from typing import NamedTuple

from .records import ENCODER, ENVELOPE_DECODER, Envelope
from .recover import salvage_whole
from .segment import (
    ENVLEN,
    HEADER,
    HEADER_SIZE,
    MAGIC,
    RecordType,
    frame,
    fsync_dir,
    message_payload,
    salvage,
    split_message,
    write_all,
)

__all__ = [
    "CHANGES",
    "HELD_DUE",
    "LOADING",
    "PARKED",
    "PENDING",
    "REPLACING",
    "ParkedFile",
    "envelopes",
    "file_due",
    "list_parked",
    "read_parked",
    "remove_parked",
    "rename_parked",
    "rewrite_parked",
    "settle",
    "unsettled",
    "write_parked",
]

log = logging.getLogger("fastmta.spool")

PARKED = "parked"  # under each shard directory
PENDING = ".pending"  # suffix: written, its messages' DONE records maybe not durable yet
LOADING = ".loading"  # suffix: its messages are being stored back into the log
REPLACING = ".replacing."  # "<new>.replacing.<old>": an operator's change (rewrite_parked)
HELD_DUE = 9_999_999_999_999  # ms: "never" (every message in the file is on hold)
_ENVELOPE_GUESS = 512  # bytes read past a record header at once: most envelopes fit
_NAME_RE = re.compile(r"^(\d{13})-(\d{6,})-([0-9a-zA-Z_-]+)\.park$")


class ParkedFile(NamedTuple):
    """One parked batch, known by its name alone (sorts by name: due time first)."""

    name: str
    due_ms: int
    count: int

    @property
    def due(self) -> float:
        """Unix time when its earliest message is due (``inf`` when all are held)."""
        return float("inf") if self.due_ms >= HELD_DUE else self.due_ms / 1000.0

    @classmethod
    def parse(cls, name: str) -> ParkedFile | None:
        m = _NAME_RE.match(name)
        return cls(name, int(m.group(1)), int(m.group(2))) if m else None


def file_due(envelopes: Iterable[Envelope]) -> int:
    """The due time (ms) a batch of envelopes is filed under (see the module docstring)."""
    due = HELD_DUE
    for env in envelopes:
        if env.cancelled:  # an operator's bounce waits for no timer and no release
            return 0
        if not env.held:
            due = min(due, max(0, int(env.next_attempt * 1000)))
    return due


def _name(items: Sequence[tuple[Envelope, bytes]]) -> str:
    due = file_due(env for env, _ in items)
    return f"{due:013d}-{len(items):06d}-{items[0][0].id}.park"


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


def list_parked(directory: str, *, cleanup: bool = True) -> list[ParkedFile]:
    """The parked files of ``<directory>/parked``, earliest due first. With ``cleanup``, tmp
    files of writes a crash interrupted are deleted."""
    path = os.path.join(directory, PARKED)
    out = []
    for name in _listdir(path):
        pf = ParkedFile.parse(name)
        if pf is not None:
            out.append(pf)
        elif cleanup and name.startswith(".") and name.endswith(".tmp"):
            os.unlink(os.path.join(path, name))
    out.sort()
    return out


def write_parked(
    directory: str, items: Sequence[tuple[Envelope, bytes]], *, fsync: bool = True, suffix: str = ""
) -> ParkedFile:
    """Durably write one parked file of (envelope, wire bytes), its name followed by
    ``suffix`` (PENDING, or "" for a file that counts at once); returns it. Raises OSError
    (nothing is left behind then but possibly a tmp file)."""
    if not items:
        raise ValueError("nothing to park")
    path = os.path.join(directory, PARKED)
    os.makedirs(path, exist_ok=True)
    name = _name(items)
    tmp = os.path.join(path, f".{name}.tmp")
    iov: list[bytes | memoryview] = []
    for env, data in items:
        iov += frame(RecordType.MESSAGE, message_payload(ENCODER.encode(env), [data]))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        write_all(fd, iov, 0)
        if fsync:
            os.fsync(fd)
        os.rename(tmp, os.path.join(path, name + suffix))
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    finally:
        os.close(fd)
    if fsync:
        fsync_dir(path)
    return ParkedFile.parse(name)  # type: ignore[return-value]


def read_parked(directory: str, name: str) -> list[tuple[Envelope, bytes]] | None:
    """The messages of one parked file; None if it is gone (or damaged with no sound record
    left). A damaged file costs only its damaged records: the sound ones are all returned,
    each damaged span is logged and the file is renamed to .bad (see the module docstring)."""
    return _read(directory, name)[0]


def _read(directory: str, name: str) -> tuple[list[tuple[Envelope, bytes]] | None, bool]:
    """read_parked(), and whether the file was damaged (and so renamed to .bad)."""
    path = os.path.join(directory, PARKED, name)
    try:
        with open(path, "rb") as f:
            buf = f.read()
    except FileNotFoundError:
        return None, False
    records, spans = salvage_whole(buf, f"parked file {path}")
    out = []
    damaged = bool(spans)
    for _, rtype, payload in records:
        try:
            if rtype != RecordType.MESSAGE:
                raise ValueError(f"record type {rtype}")
            env_bytes, at = split_message(payload)
            out.append((ENVELOPE_DECODER.decode(env_bytes).share_strings(), bytes(payload[at:])))
        except ValueError as e:  # msgspec.DecodeError is a ValueError
            log.error("parked file %s: a record is damaged (%s)", path, e)
            damaged = True
    if damaged:
        log.error("parked file %s is damaged: renamed to .bad, %d messages read", path, len(out))
        os.rename(path, path + ".bad")
        if not out:
            return None, True
    return out, damaged


def envelopes(directory: str, name: str) -> list[tuple[Envelope, int, int]]:
    """(envelope, offset, length of the message bytes) of each message in a parked file, read
    only ([] if the file is gone). Only the record headers and envelopes are read, not the
    message bytes (nor their crc: loading the file checks it), so `fastmta queue list` over a
    big parked queue reads a few hundred bytes per message. A damaged header or length makes
    it read the whole file and list its sound records, as loading it would (read_parked)."""
    path = os.path.join(directory, PARKED, name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return []
    out = []
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos + HEADER_SIZE + ENVLEN.size <= size:  # bounded: pos only grows
            head = os.pread(fd, HEADER_SIZE + ENVLEN.size + _ENVELOPE_GUESS, pos)
            magic, rtype, _, _, length, _ = HEADER.unpack_from(head)
            (envlen,) = ENVLEN.unpack_from(head, HEADER_SIZE)
            start = pos + HEADER_SIZE
            if magic != MAGIC or start + length > size or ENVLEN.size + envlen > length:
                break  # damaged: salvaged below
            env_at = HEADER_SIZE + ENVLEN.size
            env_bytes = head[env_at : env_at + envlen]
            if len(env_bytes) < envlen:
                env_bytes = os.pread(fd, envlen, pos + env_at)
            if rtype == RecordType.MESSAGE:
                try:
                    env = ENVELOPE_DECODER.decode(env_bytes)
                except ValueError:
                    env = None
                if env is not None:
                    data_at = ENVLEN.size + envlen
                    out.append((env, start + data_at, length - data_at))
            pos = start + length
    finally:
        os.close(fd)
    return out if pos == size else _salvaged_envelopes(path)


def _salvaged_envelopes(path: str) -> list[tuple[Envelope, int, int]]:
    """envelopes() of a damaged parked file: the sound records segment.salvage finds in it
    (rare, so the whole file is read; it is one batch, read whole when it is loaded too)."""
    try:
        with open(path, "rb") as f:
            buf = f.read()
    except FileNotFoundError:
        return []
    out = []
    for pos, rtype, payload in salvage(buf)[0]:
        if rtype != RecordType.MESSAGE:
            continue
        try:
            env_bytes, at = split_message(payload)
            env = ENVELOPE_DECODER.decode(env_bytes)
        except ValueError:  # msgspec.DecodeError is a ValueError
            continue
        out.append((env, pos + HEADER_SIZE + at, len(payload) - at))
    return out


def rewrite_parked(
    directory: str,
    name: str,
    change: Callable[[Envelope], bool | None],
    *,
    fsync: bool = True,
) -> tuple[ParkedFile | None, list[str]]:
    """Apply an operator change to every message of a parked file: ``change(env)`` returns
    True (changed), False (left alone) or None (delete the message). When something changed,
    the file is replaced by one with the new contents and name (or removed when empty).

    Returns (the file now holding the messages, or None when none is left; queue ids that
    ``change`` did not return False for). A file that is gone yields (None, []). A damaged
    file (renamed to .bad by read_parked) is written anew with its sound messages, even when
    nothing changed, so they stay parked."""
    items, damaged = _read(directory, name)
    if items is None:
        return None, []
    kept: list[tuple[Envelope, bytes]] = []
    touched: list[str] = []
    for env, data in items:
        r = change(env)
        if r is not False:
            touched.append(env.id)
        if r is not None:
            kept.append((env, data))
    pf = ParkedFile.parse(name)
    if not touched and not damaged:
        return pf, []
    if not kept:
        remove_parked(directory, name, fsync=fsync)
        return None, touched
    if _name(kept) == name:  # the same name: replaced by the rename, atomically
        return write_parked(directory, kept, fsync=fsync), touched
    # A new name: written as "<new>.replacing.<old>", the old file removed, then renamed, so
    # a crash leaves the messages in one of the two (settle() finishes or undoes it).
    new = write_parked(directory, kept, fsync=fsync, suffix=REPLACING + name)
    remove_parked(directory, name, fsync=fsync)
    rename_parked(directory, new.name + REPLACING + name, new.name, fsync=fsync)
    return new, touched


def _flush(env: Envelope) -> bool:
    if not env.held:
        env.next_attempt = 0.0
    return True


# The operator commands as changes for rewrite_parked: every message they name is "found"
# (True), whether or not it changed; delete removes it (None).
CHANGES: dict[str, Callable[[Envelope], bool | None]] = {
    "hold": lambda env: env.hold() or True,
    "release": lambda env: env.release() or True,
    "delete": lambda env: None,
    "flush": _flush,
}


def rename_parked(directory: str, old: str, new: str, *, fsync: bool = True) -> None:
    """Rename a parked file (to or from its PENDING / LOADING name), durably."""
    path = os.path.join(directory, PARKED)
    os.rename(os.path.join(path, old), os.path.join(path, new))
    if fsync:
        fsync_dir(path)


def unsettled(directory: str, *, view: bool = False) -> list[str]:
    """Names of the PENDING, LOADING and REPLACING files a crash left (see :func:`settle`).
    With ``view`` (a read-only look at the queue), a replacement whose old file is still
    there is left out: the old file holds its messages."""
    path = os.path.join(directory, PARKED)
    out = []
    for n in _listdir(path):
        old = n.partition(REPLACING)[2]
        if old:
            if not (view and os.path.exists(os.path.join(path, old))):
                out.append(n)
        elif n.endswith((PENDING, LOADING)):
            out.append(n)
    return sorted(out)


def settle(directory: str, live: Container[str], *, fsync: bool = True) -> int:
    """Finish what a crash interrupted (see the module docstring): each PENDING or LOADING
    file is replaced by a parked file of its messages whose queue ids are not ``live`` in the
    log (or just removed). Returns the number of files settled. Blocking."""
    settled = 0
    for name in unsettled(directory):
        settled += 1
        new, _, old = name.partition(REPLACING)
        if old:  # an operator's change: undone if the old file is still there, else done
            if os.path.exists(os.path.join(directory, PARKED, old)):
                remove_parked(directory, name, fsync=fsync)
            else:
                rename_parked(directory, name, new, fsync=fsync)
            continue
        items = read_parked(directory, name) or []
        keep = [(env, data) for env, data in items if env.id not in live]
        log.warning(
            "parked file %s was left by a crash: %d of its %d messages stay parked",
            name, len(keep), len(items),
        )  # fmt: skip
        if keep:
            write_parked(directory, keep, fsync=fsync)
        remove_parked(directory, name, fsync=fsync)
    return settled


def remove_parked(directory: str, name: str, *, fsync: bool = True) -> None:
    """Delete a parked file (its messages are elsewhere now)."""
    path = os.path.join(directory, PARKED)
    try:
        os.unlink(os.path.join(path, name))
    except FileNotFoundError:
        return
    if fsync:
        fsync_dir(path)
