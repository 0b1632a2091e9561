"""Spool records: the msgspec Structs written to the segment log, and queue ids.

Schema evolution (msgspec docs/schema-evolution.rst): records only ever GAIN fields, each with a
default, so a newer fastmta reads an older spool and an older one ignores unknown fields.
Field names are the wire keys: never rename one.
"""

from __future__ import annotations

import enum
import os
import sys
import threading
import time
from collections.abc import Iterable

import msgspec

__all__ = [
    "PENDING",
    "Done",
    "Envelope",
    "RcptState",
    "Recipient",
    "RecipientUpdate",
    "StoredMessage",
    "new_queue_id",
]


class RcptState(enum.IntEnum):
    """Per-recipient delivery state. DEFERRED = still pending, but tried at least once."""

    PENDING = 0
    DELIVERED = 1
    BOUNCED = 2
    DEFERRED = 3
    CANCELLED = 4  # bounced by an operator (`fastmta queue bounce`); its DSN is yet to be sent


# Recipient states still to be delivered (CANCELLED waits for its bounce, not for delivery).
PENDING = (RcptState.PENDING, RcptState.DEFERRED)


class Recipient(msgspec.Struct, array_like=False, omit_defaults=True):
    address: str  # "user@example.com" (no angle brackets)
    state: int = 0  # RcptState
    notify: str | None = None  # DSN NOTIFY= value as received (RFC 3461 section 4.1)
    orcpt: str | None = None  # DSN ORCPT= value (RFC 3461 section 4.2)
    last_reply: str | None = None  # e.g. "451 4.7.1 try later" (last attempt's reply)


class Envelope(msgspec.Struct, omit_defaults=True):
    id: str  # queue id: unique, URL-safe, sortable by arrival (see new_queue_id)
    sender: str  # "" for the null reverse-path (RFC 5321 section 4.5.5)
    recipients: list[Recipient]
    arrival: float  # unix time
    version: int = 1
    size: int = 0  # bytes of message in wire form (set by Spool.store)
    body: str | None = None  # "7BIT" | "8BITMIME" | "BINARYMIME" (RFC 6152, RFC 3030)
    smtputf8: bool = False  # RFC 6531
    ret: str | None = None  # DSN RET=FULL|HDRS (RFC 3461 section 4.3)
    envid: str | None = None  # DSN ENVID= (RFC 3461 section 4.4)
    attempts: int = 0
    next_attempt: float = 0.0  # unix time; 0 = now
    client: str | None = None  # "[1.2.3.4]" + helo, for logs
    auth: str | None = None  # authenticated user, if any
    is_bounce: bool = False  # a DSN we generated: never bounce a bounce
    held: bool = False  # on hold (`fastmta queue hold`): not delivered until released
    warned: bool = False  # the delay warning DSN was sent (RFC 3464 "delayed"): only once
    message_id: str | None = None  # the Message-ID: field, for logs and `fastmta queue show`

    def share_strings(self) -> Envelope:
        """Make ``sender`` and ``client`` the interned copies: bulk mail repeats them in every
        queued message, and each queued envelope stays in memory (about 0.13 KB saved each)."""
        self.sender = sys.intern(self.sender)
        if self.client:
            self.client = sys.intern(self.client)
        return self

    def cancel(self, indexes: Iterable[int], reason: str) -> int:
        """Bounce these recipients by the operator's decision (`fastmta queue bounce`): those
        still pending become CANCELLED, with ``reason`` as their last reply, and the delivery
        engine bounces them (with a DSN) when it next takes the message up. Returns how many
        were marked."""
        marked = 0
        for i in indexes:
            r = self.recipients[i]
            if r.state in PENDING:
                r.state = RcptState.CANCELLED
                r.last_reply = reason
                marked += 1
        return marked

    @property
    def cancelled(self) -> bool:
        """Some recipient waits for the bounce an operator asked for (see :meth:`cancel`)."""
        return any(r.state == RcptState.CANCELLED for r in self.recipients)

    def hold(self) -> bool:
        """Put on hold (`fastmta queue hold`); True if it was not held."""
        was = self.held
        self.held = True
        return not was

    def release(self) -> bool:
        """Off hold and due at once (`fastmta queue release`); True if it was held."""
        if not self.held:
            return False
        self.held = False
        self.next_attempt = 0.0
        return True


class RecipientUpdate(msgspec.Struct, omit_defaults=True):
    """RECIPIENT-UPDATE record: the mutable part of an Envelope, without the message bytes.

    `states[i]` / `replies[i]` belong to `Envelope.recipients[i]` (the recipient list itself never
    changes after store, so the index is stable).
    """

    id: str
    states: list[int]
    replies: list[str | None] = []
    attempts: int = 0
    next_attempt: float = 0.0
    version: int = 1
    held: bool = False  # Envelope.held (older records lack it: they were never held)
    warned: bool = False  # Envelope.warned (older records lack it)

    @classmethod
    def of(cls, env: Envelope) -> RecipientUpdate:
        """Snapshot the mutable state of `env`."""
        rc = env.recipients
        return cls(
            env.id,
            [r.state for r in rc],
            [r.last_reply for r in rc],
            env.attempts,
            env.next_attempt,
            held=env.held,
            warned=env.warned,
        )

    def apply(self, env: Envelope) -> None:
        """Write this snapshot back into `env` (extra/missing indexes are ignored)."""
        for r, state in zip(env.recipients, self.states, strict=False):
            r.state = state
        for r, reply in zip(env.recipients, self.replies, strict=False):
            r.last_reply = reply
        env.attempts = self.attempts
        env.next_attempt = self.next_attempt
        env.held = self.held
        env.warned = self.warned


class Done(msgspec.Struct, omit_defaults=True):
    """DONE record: every recipient of this message is final; it never needs delivery again."""

    id: str
    version: int = 1


class StoredMessage(msgspec.Struct):
    """A live message in the spool (in memory only, never written): its envelope and where its
    wire-form bytes are. Pass it to Spool.read() to get the bytes."""

    envelope: Envelope
    segment: int  # segment number
    offset: int  # byte offset of the message bytes in the segment file
    length: int  # == envelope.size
    record_offset: int = 0  # byte offset of its MESSAGE (or MOVE) record's header


# Reused encoder/decoders (STYLE.md 6): building them per call costs more than the work.
ENCODER = msgspec.msgpack.Encoder()
ENVELOPE_DECODER = msgspec.msgpack.Decoder(Envelope)
UPDATE_DECODER = msgspec.msgpack.Decoder(RecipientUpdate)
DONE_DECODER = msgspec.msgpack.Decoder(Done)

# Queue ids: 14 hex digits of microseconds since the epoch (sortable until the year 2540),
# 6 hex digits of per-process randomness (several workers and `fastmta send` inject at once),
# 4 hex digits of a counter (unique within one microsecond of one process).
_id_lock = threading.Lock()
_id_state = {"node": "", "last": 0, "counter": 0}


def _reseed() -> None:
    _id_state["node"] = os.urandom(3).hex()
    _id_state["last"] = 0
    _id_state["counter"] = 0


_reseed()
os.register_at_fork(after_in_child=_reseed)


def new_queue_id() -> str:
    """A new queue id: 24 lowercase hex characters, URL- and filename-safe, sorted by arrival.

    Unique across processes (random node part) and within a process (monotonic counter);
    thread-safe. Example: "00061b2c3d4e5f3f2a1b0001".
    """
    with _id_lock:
        now = time.time_ns() // 1000
        st = _id_state
        if now <= st["last"]:
            # Same microsecond (or the clock stepped back): keep ids increasing.
            st["counter"] += 1
            if st["counter"] > 0xFFFF:
                st["last"] += 1
                st["counter"] = 0
            now = st["last"]
        else:
            st["last"] = now
            st["counter"] = 0
        return f"{now:014x}{st['node']}{st['counter']:04x}"
