"""Suspended domains (``fastmta queue suspend``): no delivery to them until resumed or expired.

Like KumoMTA's ``kcli suspend`` or Postfix's ``defer_transports``: when a mailbox provider
starts refusing, an operator stops sending there without touching the messages. Mail for a
suspended domain is deferred at each attempt without a connection (``451 4.3.2 ... suspended``,
its retry schedule and max_lifetime unchanged); ``resume`` makes it due again at once.

The list lives in one file, ``<spool_dir>/suspended.json`` (JSON lines, written atomically by
the CLI), so every worker sees the same list, a restart keeps it, and the CLI can change it
with the server stopped. Workers read it at start and when the CLI tells them it changed.
"""

from __future__ import annotations

import os
import time

import msgspec

from fastmta.atomic import replace_file
from fastmta.protocol.replies import Reply, reply

__all__ = ["FILE", "Suspension", "load", "path", "save", "suspended"]

FILE = "suspended.json"


class Suspension(msgspec.Struct, omit_defaults=True):
    domain: str  # lower case, no trailing dot
    since: float  # unix time
    until: float = 0.0  # unix time; 0: until resumed
    reason: str = ""  # the operator's words (in the deferral reply)

    def active(self, now: float) -> bool:
        return not self.until or now < self.until

    def reply(self) -> Reply:
        why = f": {self.reason}" if self.reason else ""
        text = f"Delivery to {self.domain} suspended by the mail system administrator{why}"
        return reply(451, "4.3.2", text)


_DECODER = msgspec.json.Decoder(Suspension)
_ENCODER = msgspec.json.Encoder()


def path(spool_root: str) -> str:
    return os.path.join(spool_root, FILE)


def load(spool_root: str, now: float | None = None) -> dict[str, Suspension]:
    """The active suspensions by domain (expired ones left out). A missing file is an empty
    list; a damaged line raises ValueError naming the file and line."""
    now = time.time() if now is None else now
    out: dict[str, Suspension] = {}
    try:
        with open(path(spool_root), "rb") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return out
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            s = _DECODER.decode(line)
        except msgspec.DecodeError as e:
            raise ValueError(f"{path(spool_root)}, line {n}: {e}") from None
        if s.active(now):
            out[s.domain] = s
    return out


def save(spool_root: str, suspensions: dict[str, Suspension]) -> None:
    """Replace the file (atomic.replace_file): readers see the old list or the new one,
    never half. No file when the list is empty."""
    target = path(spool_root)
    if not suspensions:
        try:
            os.unlink(target)
        except FileNotFoundError:
            pass
        return
    os.makedirs(spool_root, exist_ok=True)
    replace_file(
        target, _ENCODER.encode_lines(sorted(suspensions.values(), key=lambda s: s.domain)), 0o644
    )


def suspended(
    suspensions: dict[str, Suspension], domain: str, now: float | None = None
) -> Suspension | None:
    """The suspension that holds ``domain`` (lower case) now, if any."""
    s = suspensions.get(domain)
    if s is None or not s.active(time.time() if now is None else now):
        return None
    return s
