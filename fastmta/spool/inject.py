"""Injection from another process (`fastmta send`), and the claim side of adoption.

Protocol (all renames are within one filesystem, hence atomic):

1. inject(): write `<root>/incoming/.<id>.<pid>.tmp` (one MESSAGE record, the segment framing),
   fsync it, rename it to `<root>/incoming/<id>.msg`, fsync `incoming/`. The message is durable
   when inject() returns, whether or not a server is running.
2. claim_incoming() (a server shard, in a worker thread): os.rename each `incoming/<id>.msg`
   into the shard's own `adopting/` directory. Rename-to-claim: when two shards or processes
   race, exactly one rename succeeds; the loser gets FileNotFoundError and skips the file.
   Both directories are fsync'd before the message is appended to the shard's log, so a claim
   is never undone by a crash after the append.
3. Spool.adopt_incoming() appends the claimed messages to the shard's log (durably), then
   unlinks the claimed files. A crash between append and unlink leaves the file in
   `adopting/`; the next adoption sees its queue id already live in the spool and only unlinks
   it. Only if that message was already finished AND the unlink was lost could it be delivered
   twice: at-least-once, never lost.
"""

from __future__ import annotations

import logging
import os

from .errors import SpoolError
from .records import ENCODER, ENVELOPE_DECODER, Envelope, new_queue_id
from .recover import salvage_whole
from .segment import (
    RecordType,
    frame,
    fsync_dir,
    message_payload,
    split_message,
    write_all,
)

log = logging.getLogger("fastmta.spool")

INCOMING = "incoming"  # under the spool root, shared by all shards
ADOPTING = "adopting"  # under each shard directory
SUFFIX = ".msg"


def inject(
    directory: str | os.PathLike[str],
    envelope: Envelope,
    data: bytes,
    *,
    fsync: bool = True,
) -> str:
    """Durably drop one message into `<directory>/incoming/` for a server to adopt. Synchronous.

    `data` is the message in wire form (CRLF, dot-stuffed, without the final ".\\r\\n").
    Assigns `envelope.id` (new_queue_id()) if empty and sets `envelope.size`. Returns the
    queue id. Raises SpoolError on any OSError (nothing is left behind but possibly a tmp file).
    """
    if not envelope.id:
        envelope.id = new_queue_id()
    envelope.size = len(data)
    incoming = os.path.join(os.fspath(directory), INCOMING)
    tmp = os.path.join(incoming, f".{envelope.id}.{os.getpid()}.tmp")
    final = os.path.join(incoming, envelope.id + SUFFIX)
    try:
        os.makedirs(incoming, exist_ok=True)
        iov = frame(RecordType.MESSAGE, message_payload(ENCODER.encode(envelope), [data]))
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            write_all(fd, iov, 0)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, final)
        if fsync:
            fsync_dir(incoming)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise SpoolError(f"inject failed: {e}", e.errno) from e
    return envelope.id


def claim_incoming(
    incoming: str, shard: str, limit: int, *, fsync: bool = True
) -> list[tuple[str, Envelope, bytes]]:
    """Claim up to `limit` injected messages for `shard`; return (claimed path, envelope, data).

    Leftovers already in `<shard>/adopting/` (a crash before their unlink) come first.
    Blocking: run it in a worker thread. A claimed file that does not hold exactly one sound
    MESSAGE record is renamed to `*.bad` (kept for the operator) and skipped. Damage outside
    that record (segment.salvage) is logged and the file copied to `*.bad`; its message is
    adopted.
    """
    adopting = os.path.join(shard, ADOPTING)
    os.makedirs(adopting, exist_ok=True)
    names = sorted(n for n in os.listdir(adopting) if n.endswith(SUFFIX))[:limit]
    claimed_new = False
    if len(names) < limit and os.path.isdir(incoming):
        for name in sorted(os.listdir(incoming)):
            if not name.endswith(SUFFIX) or name.startswith("."):
                continue
            try:
                os.rename(os.path.join(incoming, name), os.path.join(adopting, name))
            except FileNotFoundError:
                continue  # another shard won the race
            names.append(name)
            claimed_new = True
            if len(names) >= limit:
                break
    if claimed_new and fsync:
        fsync_dir(adopting)
        fsync_dir(incoming)
    out = []
    for name in names:
        path = os.path.join(adopting, name)
        with open(path, "rb") as f:
            buf = f.read()
        records, spans = salvage_whole(buf, f"injected file {path}")
        try:
            if len(records) != 1 or records[0][1] != RecordType.MESSAGE:
                raise ValueError("not exactly one sound MESSAGE record")
            env_bytes, data_at = split_message(records[0][2])
            env = ENVELOPE_DECODER.decode(env_bytes)
            data = bytes(records[0][2][data_at:])
        except ValueError as e:  # msgspec.DecodeError is a ValueError
            log.error("injected file %s is damaged (%s): renamed to .bad", path, e)
            os.rename(path, path + ".bad")
            continue
        if spans:  # the sound message is adopted; the file is kept for the operator
            _keep_bad(path, buf)
        out.append((path, env, data))
    return out


def _keep_bad(path: str, buf: bytes) -> None:
    """Copy a damaged file whose message is adopted anyway to ``<path>.bad`` (the claimed
    file itself is unlinked once the message is in the log). A failure is only logged."""
    try:
        with open(path + ".bad", "xb") as f:  # a claim retried after a crash finds it there
            f.write(buf)
    except FileExistsError:
        return
    except OSError as e:
        log.error("injected file %s: keeping a copy as .bad failed: %s", path, e)
        return
    log.error("injected file %s: its sound message is adopted, the file kept as .bad", path)


def unlink_claimed(paths: list[str], shard: str, *, fsync: bool = True) -> None:
    """Remove adopted files (their messages are durable in the shard's log). Blocking."""
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass
    if paths and fsync:
        fsync_dir(os.path.join(shard, ADOPTING))
