"""The queue's scheduling state: which message is due, which may be loaded, how to batch it.

Pure bookkeeping: no I/O, no asyncio, an injectable clock (Unix time). The engine
(fastmta/delivery/engine.py) drives it:

- :meth:`Scheduler.add` a message (new, recovered, or retried): due now -> the ready backlog,
  later -> the :class:`TimerQueue` (O(log n)).
- :meth:`Scheduler.take_ready` moves due timers to the backlog and hands out backlog messages
  while fewer than ``max_in_memory`` are *active* (their bytes loaded, being delivered). The
  others stay as index entries only (the StoredMessage, a timer); past
  ``queue.max_resident`` the engine parks them on disk (see :meth:`Scheduler.evict`).
- Each active message ends with :meth:`finished` (every recipient final) or :meth:`retry`
  (next attempt per the :class:`RetrySchedule`, jittered, never after expiry); both free its
  memory slot.
- :meth:`Scheduler.evict` takes out the waiting messages due last (then the newest of the
  backlog) when the engine parks part of a big queue on disk (fastmta/spool/parked.py).
- :func:`batches` splits a message's pending recipients by domain, at most
  ``recipients_per_transaction`` each (Postfix smtp_destination_recipient_limit).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Mapping

from fastmta.protocol.errors import domain_of
from fastmta.queue.retry import RetrySchedule
from fastmta.queue.timers import TimerQueue
from fastmta.spool.records import PENDING as _PENDING
from fastmta.spool.records import Envelope, StoredMessage

__all__ = ["Scheduler", "batches", "domain_of"]


def batches(
    env: Envelope, per_transaction: int = 50, per_domain: Mapping[str, int] | None = None
) -> list[tuple[str, list[int]]]:
    """Pending recipient indexes grouped by domain (first-seen order), each group cut into
    runs of at most ``per_transaction`` (``per_domain[domain]`` for a domain listed there).
    No I/O; O(recipients)."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(env.recipients):
        if r.state in _PENDING:
            d = domain_of(r.address)
            g = groups.get(d)
            if g is None:
                groups[d] = [i]
            else:
                g.append(i)
    out: list[tuple[str, list[int]]] = []
    for d, idx in groups.items():
        n = per_domain.get(d, per_transaction) if per_domain else per_transaction
        for k in range(0, len(idx), n):
            out.append((d, idx[k : k + n]))
    return out


class Scheduler:
    """Due times and the in-memory cap of one queue (see the module docstring)."""

    def __init__(
        self,
        schedule: RetrySchedule | None = None,
        *,
        max_in_memory: int = 10_000,
        recipients_per_transaction: int = 50,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_in_memory < 1 or recipients_per_transaction < 1:
            raise ValueError("max_in_memory and recipients_per_transaction must be >= 1")
        self.schedule = schedule or RetrySchedule()
        self.max_in_memory = max_in_memory
        self.recipients_per_transaction = recipients_per_transaction
        self.clock = clock
        self.timers = TimerQueue()
        self.backlog: deque[StoredMessage] = deque()
        self.waiting: dict[str, StoredMessage] = {}  # id -> message with a timer
        self.active = 0  # messages handed out by take_ready and not yet finished/retried

    def __len__(self) -> int:
        """Messages known: waiting on a timer, in the backlog, or active."""
        return len(self.waiting) + len(self.backlog) + self.active

    def add(self, msg: StoredMessage, now: bool = False) -> None:
        """Schedule ``msg`` at ``envelope.next_attempt`` (0 or past: ready now), or ready
        now whatever its next attempt (``now``: an operator's bounce waits for no timer)."""
        due = msg.envelope.next_attempt
        if now or due <= 0 or due <= self.clock():
            self.backlog.append(msg)
        else:
            self.waiting[msg.envelope.id] = msg
            self.timers.push(due, msg.envelope.id)

    def take_ready(self, limit: int = 1000) -> list[StoredMessage]:
        """Due messages that fit in memory (at most ``limit``); each becomes active."""
        now = self.clock()
        room = self.max_in_memory - self.active
        if room <= 0:
            return []
        if len(self.backlog) < room:
            for key in self.timers.pop_due(now, room - len(self.backlog)):
                self.backlog.append(self.waiting.pop(key))
        out: list[StoredMessage] = []
        n = min(room, limit, len(self.backlog))
        for _ in range(n):
            out.append(self.backlog.popleft())
        self.active += n
        return out

    def finished(self, msg: StoredMessage) -> None:
        """An active message is final (or handed back): free its slot."""
        self.active -= 1

    def retry(self, msg: StoredMessage) -> float:
        """An active message has recipients left: set its next attempt (``attempts`` counts
        the attempt just made), schedule it, free its slot. Returns the due time."""
        env = msg.envelope
        now = self.clock()
        due = self.schedule.next_attempt_at(max(1, env.attempts), now, env.arrival)
        env.next_attempt = due
        self.active -= 1
        self.waiting[env.id] = msg
        self.timers.push(due, env.id)
        return due

    def evict(self, n: int, later_than: float | None = None) -> list[StoredMessage]:
        """Take out up to ``n`` messages that are not active, to be parked on disk: those
        waiting with the latest due times (only those due after ``later_than`` when given),
        then, with no ``later_than``, the newest of the backlog. They are no longer known here."""
        after = -math.inf if later_than is None else later_than
        out = [self.waiting.pop(key) for _, key in self.timers.latest(n, after)]
        for msg in out:
            self.timers.cancel(msg.envelope.id)
        if later_than is None:
            while len(out) < n and self.backlog:
                out.append(self.backlog.pop())
        return out

    def expired(self, env: Envelope) -> bool:
        return self.schedule.expired(env.arrival, self.clock())

    def next_due(self) -> float | None:
        """When take_ready may next return something new from the timers (None: never)."""
        return self.timers.next_due()

    def flush(self) -> int:
        """Make every waiting message due now (``fastmta queue flush``); returns how many."""
        keys = self.timers.pop_due(math.inf, len(self.timers) + 1)
        for key in keys:
            msg = self.waiting.pop(key)
            msg.envelope.next_attempt = 0.0
            self.backlog.append(msg)
        return len(keys)

    def remove(self, queue_id: str) -> StoredMessage | None:
        """Forget a waiting message (deleted from the queue by an operator)."""
        if self.timers.cancel(queue_id):
            return self.waiting.pop(queue_id, None)
        return None
