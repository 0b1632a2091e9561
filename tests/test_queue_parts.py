"""Retry schedule, timer queue and per-site limits (pure data structures, fake clocks)."""

from __future__ import annotations

import random
import time

import pytest

from fastmta.config import load_config
from fastmta.delivery.routing import Router
from fastmta.queue.limits import SiteLimits, TokenBucket
from fastmta.queue.retry import RetrySchedule
from fastmta.queue.sites import limits_for
from fastmta.queue.timers import TimerQueue


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


# -- retry ------------------------------------------------------------------------------------


def test_next_delay_without_jitter_follows_list_then_repeats_last():
    s = RetrySchedule([60, 300, 900], jitter=0)
    assert [s.next_delay(a) for a in range(1, 7)] == [60, 300, 900, 900, 900, 900]
    with pytest.raises(ValueError):
        s.next_delay(0)


def test_jitter_stays_in_bounds_and_spreads_a_backlog():
    s = RetrySchedule([100, 1000], jitter=0.2, rng=random.Random(7))
    delays = [s.next_delay(2) for _ in range(10_000)]
    assert all(800 <= d <= 1200 for d in delays)
    # A backlog deferred together comes back spread over the whole window, not at one instant.
    assert max(delays) - min(delays) > 350
    assert len({round(d, 3) for d in delays}) > 5000
    lower = sum(d < 1000 for d in delays)
    assert 4000 < lower < 6000


def test_schedule_validates_its_parameters():
    for kwargs in ({"intervals": []}, {"intervals": [0]}, {"jitter": 1.0}, {"max_lifetime": 0}):
        with pytest.raises(ValueError):
            RetrySchedule(**kwargs)


def test_expired_and_final_attempt_at_expiry():
    s = RetrySchedule([3600], jitter=0, max_lifetime=86400)
    assert not s.expired(arrival=0, now=86399)
    assert s.expired(arrival=0, now=86400)
    assert s.next_attempt_at(5, now=1000, arrival=0) == 4600
    assert s.next_attempt_at(5, now=86000, arrival=0) == 86400  # capped at expiry


def test_delay_warning_once_after_threshold_and_not_when_expired():
    s = RetrySchedule([60], jitter=0, max_lifetime=5 * 86400)
    assert not s.delay_warning_due(0, 4 * 3600 - 1, warned=False, delay_warning=4 * 3600)
    assert s.delay_warning_due(0, 4 * 3600, warned=False, delay_warning=4 * 3600)
    assert not s.delay_warning_due(0, 4 * 3600, warned=True, delay_warning=4 * 3600)
    assert not s.delay_warning_due(0, 10 * 86400, warned=False, delay_warning=4 * 3600)
    assert not s.delay_warning_due(0, 86400, warned=False, delay_warning=0)  # disabled


# -- timers -----------------------------------------------------------------------------------


def test_timer_pops_in_due_order_and_respects_now_and_limit():
    q = TimerQueue()
    for due, key in [(5, "e"), (1, "a"), (3, "c"), (2, "b"), (4, "d")]:
        q.push(due, key)
    assert len(q) == 5 and q.next_due() == 1
    assert q.pop_due(0.5) == []
    assert q.pop_due(3, limit=2) == ["a", "b"]
    assert q.pop_due(3) == ["c"]
    assert q.next_due() == 4 and len(q) == 2
    assert q.pop_due(100) == ["d", "e"]
    assert q.next_due() is None and len(q) == 0


def test_timer_equal_due_times_pop_in_insertion_order():
    q = TimerQueue()
    for k in "xyzw":
        q.push(7.0, k)
    assert q.pop_due(7.0) == list("xyzw")


def test_timer_reschedule_replaces_and_cancel_removes():
    q = TimerQueue()
    q.push(10, "m1")
    q.push(20, "m2")
    q.push(30, "m1")  # later: the stale entry at 10 must be skipped
    assert len(q) == 2 and q.due_of("m1") == 30
    assert q.next_due() == 20
    assert q.pop_due(25) == ["m2"]
    q.push(5, "m1")  # earlier again
    assert q.pop_due(5) == ["m1"]
    assert q.pop_due(1000) == []  # the old entry at 30 is stale
    q.push(1, "c")
    assert q.cancel("c") and not q.cancel("c")
    assert "c" not in q and q.next_due() is None and q.pop_due(1e9) == []


def test_timer_cancel_then_push_same_due_pops_once():
    q = TimerQueue()
    q.push(1, "k")
    q.cancel("k")
    q.push(1, "k")
    assert q.pop_due(1) == ["k"]
    assert len(q) == 0 and q.pop_due(2) == []


def test_timer_heap_stays_bounded_under_constant_rescheduling():
    q = TimerQueue()
    for i in range(200_000):
        q.push(float(i), f"k{i % 100}")
    assert len(q) == 100
    assert len(q._heap) <= 2 * 100 + 1024 + 1  # stale entries are compacted away
    keys = q.pop_due(1e9, limit=1000)
    assert sorted(keys) == sorted(f"k{i}" for i in range(100))


def test_timer_one_million_push_and_pop_in_order():
    rng = random.Random(1)
    n = 1_000_000
    dues = [rng.random() * 86400 for _ in range(n)]
    q = TimerQueue()
    start = time.perf_counter()
    for i, due in enumerate(dues):
        q.push(due, str(i))
    assert len(q) == n
    order: list[str] = []
    now = 0.0
    while len(q):
        now += 3600
        while batch := q.pop_due(now, limit=10_000):
            order.extend(batch)
        nxt = q.next_due()
        assert nxt is None or nxt > now  # everything due was popped, nothing early
    elapsed = time.perf_counter() - start
    assert len(order) == n and len(set(order)) == n
    popped_dues = [dues[int(k)] for k in order]
    assert all(a <= b for a, b in zip(popped_dues, popped_dues[1:], strict=False))
    assert q.next_due() is None
    assert elapsed < 20, elapsed  # about 2-3 s; generous for a loaded 2-core machine


# -- limits -----------------------------------------------------------------------------------


def test_token_bucket_burst_then_rate():
    clock = FakeClock()
    b = TokenBucket(rate=10, burst=3, clock=clock)
    assert [b.try_take() for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = b.try_take()
    assert wait == pytest.approx(0.1)
    clock.t += 0.05
    assert b.try_take() == pytest.approx(0.05)  # a refusal takes nothing
    clock.t += 0.05
    assert b.try_take() == 0.0
    assert b.try_take() == pytest.approx(0.1)
    clock.t += 100  # long idle: refills only up to burst
    assert [b.try_take() for _ in range(4)][:3] == [0.0, 0.0, 0.0]
    assert b.try_take() > 0


def test_token_bucket_sustained_rate_matches_configuration():
    clock = FakeClock()
    b = TokenBucket(rate=50, clock=clock)  # burst defaults to one second's worth
    taken = 0
    for _ in range(10_000):
        wait = b.try_take()
        if wait == 0:
            taken += 1
        else:
            clock.t += wait
    # 10 s of fake time at 50/s plus the initial burst of 50.
    assert clock.t - 1000.0 == pytest.approx((taken - 50) / 50, rel=1e-6)


def test_token_bucket_rate_zero_is_unlimited_and_validation():
    b = TokenBucket(0, clock=FakeClock())
    assert all(b.try_take() == 0.0 for _ in range(100_000))
    with pytest.raises(ValueError):
        TokenBucket(-1)
    with pytest.raises(ValueError):
        TokenBucket(5, burst=0.5)
    slow = TokenBucket(0.5, clock=FakeClock())  # burst defaults to 1 for rates below 1
    assert slow.try_take() == 0.0 and slow.try_take() == pytest.approx(2.0)


def test_site_limits_connection_counters():
    site = SiteLimits(max_connections=2, messages_per_connection=3, messages_per_second=0)
    assert site.can_open()
    site.opened()
    site.opened()
    assert not site.can_open()
    with pytest.raises(RuntimeError):
        site.opened()
    site.closed()
    assert site.can_open() and site.active == 1
    site.closed()
    with pytest.raises(RuntimeError):
        site.closed()
    assert not site.connection_spent(2) and site.connection_spent(3)
    assert not SiteLimits(messages_per_connection=0).connection_spent(10**9)
    with pytest.raises(ValueError):
        SiteLimits(max_connections=0)
    with pytest.raises(ValueError):
        SiteLimits(backlog=0)


def test_site_limits_from_config_with_domain_overrides():
    c = load_config(
        None,
        {
            "delivery": {"max_connections_per_site": 7, "backlog_per_connection": 3},
            "domain": {
                "big.example": {
                    "max_connections": 2,
                    "backlog_per_connection": 1,
                    "chain_wait": "20ms",
                }
            },
        },
    )
    plain = limits_for(c, "other.example")
    assert (plain.max_connections, plain.backlog, plain.chain) == (7, 3, True)
    assert plain.chain_wait == 0.05  # the default
    big = limits_for(c, "Big.Example.")
    assert (big.max_connections, big.backlog, big.chain_wait) == (2, 1, 0.02)
    assert limits_for(load_config(None, {}), None).backlog == 32  # the default


@pytest.mark.parametrize(
    "override",
    [
        {"max_connections": 2},
        {"messages_per_second": 1.0},
        {"messages_per_connection": 5},
        {"tls": "required"},
        {"chain_transactions": False},
        {"backlog_per_connection": 1},
        {"chain_wait": "1s"},
    ],
)
def test_a_domain_with_its_own_limits_gets_its_own_site(override):
    """Its limits (limits_for) apply only to a site of its own: the route carries a tag."""
    c = load_config(None, {"domain": {"big.example": override, "routed.example": {"route": "x"}}})
    router = Router(c)
    assert router.route("Big.Example").tag == "big.example"
    assert router.route("routed.example").tag == ""  # a route alone is no limit
    assert router.route("other.example").tag == ""


def test_site_limits_message_rate_uses_its_bucket():
    clock = FakeClock()
    site = SiteLimits(messages_per_second=2, burst=1, clock=clock)
    assert site.try_send() == 0.0
    assert site.try_send() == pytest.approx(0.5)
    clock.t += 0.5
    assert site.try_send() == 0.0


# --- operator selections (fastmta/queue/select.py) -----------------------------------------


def _env(qid: str, sender: str, *rcpts: tuple[str, int]):
    from fastmta.spool.records import Envelope, Recipient  # noqa: PLC0415

    return Envelope(qid, sender, [Recipient(a, state=s) for a, s in rcpts], arrival=1.0)


def test_selection_every_criterion_must_hold():
    from fastmta.queue.select import Selection  # noqa: PLC0415

    e = _env("q1", "News@Shop.test", ("a@Slow.test", 3), ("b@done.test", 1))
    assert Selection().empty and Selection().matches(e)  # `list`: everything
    assert not Selection(all=True).empty and not Selection(all=True).filtered
    assert Selection(domains=["SLOW.TEST."]).matches(e)
    assert not Selection(domains=["done.test"]).matches(e)  # delivered there already
    assert Selection(senders=["<news@shop.test>"]).matches(e)
    assert not Selection(senders=["<>"]).matches(e)
    assert Selection(senders=["<>"]).matches(_env("q2", "", ("x@y.test", 0)))
    assert Selection(ids=["q1"], domains=["slow.test"]).matches(e)
    assert not Selection(ids=["q2"], domains=["slow.test"]).matches(e)
    assert not Selection(ids=["q1"], senders=["other@shop.test"]).matches(e)


def test_selection_recipients_are_the_pending_ones_at_its_domains():
    from fastmta.queue.select import Selection  # noqa: PLC0415

    e = _env("q", "s@x.test", ("a@one.test", 0), ("b@two.test", 3), ("c@one.test", 1),
             ("d@ONE.test", 3))  # fmt: skip
    assert Selection(domains=["one.test"]).recipients(e) == [0, 3]
    assert Selection(ids=["q"]).recipients(e) == [0, 1, 3]


def test_cancel_marks_only_pending_recipients_and_makes_a_parked_file_due():
    from fastmta.queue.select import Selection, command_change  # noqa: PLC0415
    from fastmta.spool.parked import HELD_DUE, file_due  # noqa: PLC0415
    from fastmta.spool.records import RcptState  # noqa: PLC0415

    e = _env("q", "s@x.test", ("a@one.test", 3), ("b@one.test", 1), ("c@two.test", 0))
    e.held, e.next_attempt = True, 5000.0
    assert file_due([e]) == HELD_DUE and not e.cancelled
    change = command_change("bounce", Selection(domains=["one.test"]), "why")
    assert change(e) is True
    assert [r.state for r in e.recipients] == [RcptState.CANCELLED, 1, 0]
    assert e.recipients[0].last_reply == "why" and e.cancelled
    assert file_due([e]) == 0  # held or not: the bounce waits for nothing
    assert command_change("bounce", Selection(domains=["three.test"]), "x")(e) is False
    assert e.cancel([1, 2], "again") == 1  # delivered stays delivered
    assert command_change("delete", Selection(senders=["s@x.test"]))(e) is None
    assert command_change("hold", Selection(senders=["t@x.test"]))(e) is False


def test_bounce_reason_is_one_bounded_line():
    from fastmta.queue.select import MAX_REASON, bounce_reason, check_reason  # noqa: PLC0415

    assert bounce_reason("") == "Delivery cancelled by the mail system administrator"
    assert bounce_reason(" spam ").endswith("administrator: spam")
    assert "\n" not in bounce_reason("a\r\nb") and len(bounce_reason("x" * 999)) < 300
    assert check_reason("fine reason") is None
    assert "one line" in check_reason("a\nb")
    assert str(MAX_REASON) in check_reason("x" * (MAX_REASON + 1))
