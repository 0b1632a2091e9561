"""Scheduler bookkeeping with a fake clock: grouping, batching, retry timing, in-memory cap."""

from __future__ import annotations

import pytest

from fastmta.queue.retry import RetrySchedule
from fastmta.queue.scheduler import Scheduler, batches
from fastmta.spool import Envelope, RcptState, Recipient, StoredMessage


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def msg(i: int, rcpts: list[str], arrival: float = 1000.0, next_attempt: float = 0.0):
    env = Envelope(f"id{i:04d}", "s@x.test", [Recipient(r) for r in rcpts], arrival,
                   next_attempt=next_attempt)  # fmt: skip
    return StoredMessage(env, 0, 0, 0)


def test_batches_group_by_domain_and_cut():
    env = msg(1, ["a@A.test", "b@b.test", "c@a.test", "d@b.test", "e@a.test"]).envelope
    assert batches(env, 50) == [("a.test", [0, 2, 4]), ("b.test", [1, 3])]
    assert batches(env, 2) == [("a.test", [0, 2]), ("a.test", [4]), ("b.test", [1, 3])]
    # a domain with a limit of its own ([domain."b.test"] recipients_per_transaction)
    assert batches(env, 50, {"b.test": 1}) == [("a.test", [0, 2, 4]), ("b.test", [1]),
                                              ("b.test", [3])]  # fmt: skip
    env.recipients[0].state = RcptState.DELIVERED
    env.recipients[1].state = RcptState.BOUNCED
    env.recipients[2].state = RcptState.DEFERRED
    assert batches(env, 50) == [("a.test", [2, 4]), ("b.test", [3])]


def test_in_memory_cap_and_release():
    s = Scheduler(max_in_memory=3, clock=Clock())
    ms = [msg(i, ["a@x.test"]) for i in range(10)]
    for m in ms:
        s.add(m)
    first = s.take_ready()
    assert first == ms[:3] and s.active == 3 and len(s) == 10
    assert s.take_ready() == []
    s.finished(first[0])
    assert s.take_ready() == [ms[3]]
    assert len(s) == 9


def test_retry_timing_and_expiry_clamp():
    clock = Clock(1000.0)
    sched = RetrySchedule([10, 20], jitter=0.0, max_lifetime=45)
    s = Scheduler(sched, clock=clock)
    m = msg(1, ["a@x.test"])
    s.add(m)
    assert s.take_ready() == [m]
    m.envelope.attempts = 1
    assert s.retry(m) == 1010.0 and m.envelope.next_attempt == 1010.0
    assert s.active == 0 and s.next_due() == 1010.0
    clock.t = 1009.9
    assert s.take_ready() == []
    clock.t = 1010.0
    assert s.take_ready() == [m]
    m.envelope.attempts = 2
    assert s.retry(m) == 1030.0
    clock.t = 1030.0
    assert s.take_ready() == [m]
    m.envelope.attempts = 3
    assert s.retry(m) == 1045.0  # never after arrival + max_lifetime (one last try)
    clock.t = 1045.0
    assert s.take_ready() == [m] and s.expired(m.envelope)


def test_future_next_attempt_waits_and_flush():
    clock = Clock(1000.0)
    s = Scheduler(clock=clock)
    later = msg(1, ["a@x.test"], next_attempt=5000.0)
    now = msg(2, ["a@x.test"])
    s.add(later)
    s.add(now)
    assert s.take_ready() == [now]
    assert s.flush() == 1 and later.envelope.next_attempt == 0.0
    assert s.take_ready() == [later]


def test_due_timers_respect_cap():
    clock = Clock(1000.0)
    s = Scheduler(max_in_memory=2, clock=clock)
    ms = [msg(i, ["a@x.test"], next_attempt=1001.0 + i) for i in range(5)]
    for m in ms:
        s.add(m)
    clock.t = 2000.0
    assert s.take_ready() == ms[:2]
    assert len(s.timers) == 3  # the rest stay on timers (index entries only)
    s.finished(ms[0])
    s.finished(ms[1])
    assert s.take_ready() == ms[2:4]


def test_invalid_limits():
    with pytest.raises(ValueError):
        Scheduler(max_in_memory=0)


def test_evict_takes_the_latest_due_then_the_newest_backlog():
    clock = Clock(1000.0)
    s = Scheduler(max_in_memory=1, clock=clock)
    waiting = [msg(i, ["a@x.test"], next_attempt=2000.0 + i * 10) for i in range(5)]
    ready = [msg(10 + i, ["a@x.test"]) for i in range(3)]
    for m in waiting + ready:
        s.add(m)
    assert [m.envelope.id for m in s.evict(2)] == ["id0004", "id0003"]
    assert len(s) == 6 and s.timers.due_of("id0004") is None
    assert [m.envelope.id for m in s.evict(5, later_than=2015.0)] == ["id0002"]
    assert [m.envelope.id for m in s.evict(4)] == ["id0001", "id0000", "id0012", "id0011"]
    assert len(s) == 1 and s.next_due() is None
    assert [m.envelope.id for m in s.take_ready()] == ["id0010"]
