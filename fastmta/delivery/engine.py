"""The delivery engine: what the app creates to deliver what the spool holds.

    engine = DeliveryEngine(config, spool, delivery_log=log)
    await engine.start(await spool.open())   # schedule what the spool had
    engine.submit(stored)                     # after every durable store (sync, cheap)
    await engine.stop()                       # bounded: in-flight transactions finish

The path of a message: :class:`~fastmta.queue.scheduler.Scheduler` says it is due and has
memory room -> its bytes are read from the spool (one pread) -> its pending recipients are
split by domain (:func:`~fastmta.queue.scheduler.batches`) -> each batch is routed
(routing.py): local domains to Maildir (local.py), the rest to a site's ready queue in the
pool (pool.py), after one cached MX resolution -> each transaction's per-recipient replies
update the envelope and write one delivery-log line each -> when the last batch of the
attempt is back: a DSN for the recipients that failed in it (bounce.py; stored before the
original is marked), then ``spool.done`` (all final) or ``spool.update`` and a retry timer.

Outcome rules: 2xx delivered; 5xx bounced; 4xx, connection failures (after every MX address),
timeouts and transient DNS errors deferred; permanent DNS errors (NXDOMAIN 550 5.1.2, null
MX 556 5.1.10) bounced. A message still deferred after ``queue.max_lifetime`` is bounced
(outcome "expired"). All on the event loop thread; the only thread hops are the spool's group
commit and Maildir writes.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import socket
import time

import msgspec

from fastmta.config import Config
from fastmta.delivery.bounce import Failure, make_dsn, wants_notice
from fastmta.delivery.classify import Classifier
from fastmta.delivery.egress import EgressPool
from fastmta.delivery.local import LocalDelivery
from fastmta.delivery.maildir import MaildirDelivery
from fastmta.delivery.mtasts import MtaSts, enforce, fetch_policy
from fastmta.delivery.pool import AttemptInfo, ConnectionPool, Job
from fastmta.delivery.routing import Route, Router
from fastmta.delivery.smtp import Timeouts
from fastmta.dkim import Signers
from fastmta.dns import Destination, DnsError, Resolver
from fastmta.dns.mx import Plan
from fastmta.log import DeliveryLog, DeliveryRecord, ReceptionRecord
from fastmta.protocol.client import Message
from fastmta.protocol.replies import Reply, reply
from fastmta.queue import suspend
from fastmta.queue.retry import RetrySchedule
from fastmta.queue.scheduler import Scheduler, batches
from fastmta.queue.select import Selection, bounce_reason, command_change
from fastmta.queue.sites import limits_for
from fastmta.spool import Spool, SpoolError
from fastmta.spool.records import PENDING, Envelope, RcptState, StoredMessage
from fastmta.tls import shared_client_context

__all__ = ["DeliveryEngine", "EngineStats"]

log = logging.getLogger("fastmta.delivery")

_DELIVERED = int(RcptState.DELIVERED)
_BOUNCED = int(RcptState.BOUNCED)
_DEFERRED = int(RcptState.DEFERRED)
_CANCELLED = int(RcptState.CANCELLED)
_PENDING = tuple(int(s) for s in PENDING)  # plain ints: compared per recipient


class EngineStats(msgspec.Struct):
    """A snapshot. delivered/deferred/bounced count recipient outcomes; attempts count
    transactions (or local/DNS attempts); in_memory: messages loaded; queued: all known."""

    delivered: int = 0
    deferred: int = 0
    bounced: int = 0
    attempts: int = 0
    dsns: int = 0
    connections_opened: int = 0
    reused: int = 0
    chained: int = 0  # of reused: sent with the previous message's final dot
    in_memory: int = 0
    queued: int = 0
    held: int = 0  # messages on hold (fastmta queue hold), not counted in queued
    parked: int = 0  # of queued (held ones included): in parked files on disk, not in memory
    failures: dict[str, int] = msgspec.field(default_factory=dict)  # failed attempts by class


_BALANCE_BACKOFF = 5.0  # seconds without parking/loading after a parked-file error
CHECKPOINT_AFTER = 1.0  # seconds a message may wait half-delivered before that is recorded
_PARK_BYTES = 32 << 20  # message bytes per parked file at most (one message may be bigger)


class _Active:
    """A message being delivered in this attempt (its bytes are in memory)."""

    __slots__ = (
        "sm", "data", "jobs", "failures", "successes", "cancelled", "last", "attempted",
        "checkpoint",
    )  # fmt: skip

    def __init__(self, sm: StoredMessage, data: bytes) -> None:
        self.sm = sm
        self.data = data
        self.jobs = 0
        self.attempted = True  # False: taken up only to bounce what an operator cancelled
        self.failures: list[Failure] = []
        self.successes: list[Failure] = []  # deliveries whose NOTIFY asks for SUCCESS
        self.cancelled: set[int] = set()  # recipients an operator bounced, in failures
        self.last: dict[int, tuple[Reply, str]] = {}  # index -> (reply, mx) of this attempt
        self.checkpoint: asyncio.TimerHandle | None = None  # see DeliveryEngine._checkpoint


class DeliveryEngine:
    """Schedules and delivers the spool's messages (see the module docstring).

    Every limit comes from ``config``; ``resolver`` defaults to one built from [dns];
    ``delivery_log`` (optional) gets one record per recipient per attempt; ``hostname``
    (default server.hostname) is the DSN reporting MTA and the EHLO name fallback.
    ``clock`` (Unix time) and ``schedule`` exist for tests.
    """

    def __init__(
        self,
        config: Config,
        spool: Spool,
        *,
        resolver: Resolver | None = None,
        delivery_log: DeliveryLog | None = None,
        hostname: str | None = None,
        schedule: RetrySchedule | None = None,
        local_threads: int = 4,
        dkim: Signers | None = None,
    ) -> None:
        self.config = config
        self.spool = spool
        q, d = config.queue, config.delivery
        self.hostname = hostname or config.server.hostname or socket.getfqdn()
        self._own_resolver = resolver is None
        if resolver is None:
            dns = config.dns
            resolver = Resolver(
                dns.nameservers or None,
                min_ttl=dns.min_ttl,
                max_ttl=dns.max_ttl,
                negative_ttl=dns.negative_ttl,
                timeout=dns.timeout,
                prefer_ipv6=dns.prefer_ipv6,
            )
        self.resolver = resolver
        self.delivery_log = delivery_log
        self.dkim = dkim if dkim else None  # signs the DSNs, as their From: domain's key says
        self.router = Router(config)
        self.scheduler = Scheduler(
            schedule or RetrySchedule(q.retry_schedule, q.retry_jitter, q.max_lifetime),
            max_in_memory=q.max_in_memory,
            recipients_per_transaction=q.recipients_per_transaction,
        )
        ca_file = d.tls_ca_file or None
        self.pool = ConnectionPool(
            self._on_result,
            helo_name=d.helo_name or self.hostname,
            timeouts=Timeouts.from_config(d),
            idle_timeout=d.idle_timeout,
            tls_context=shared_client_context(d.tls_verify, ca_file),
            ca_file=ca_file,
            source_address=d.source_address or None,
        )
        self.egress = EgressPool.from_config(config, d.helo_name or self.hostname)
        self._egress_by_domain = {  # [domain."x"] egress: those sources only
            name: EgressPool.from_config(config, d.helo_name or self.hostname, pol.egress)
            for name, pol in config.domain.items()
            if pol.egress and config.egress
        }
        # MTA-STS policies (RFC 8461) of the domains delivered to their own MX hosts
        self.sts = MtaSts(
            resolver,
            lambda domain: fetch_policy(
                domain, resolver, shared_client_context(True, ca_file), port=d.mta_sts_port
            ),
        )
        self.local = LocalDelivery(
            MaildirDelivery.from_config(config.local, hostname=self.hostname),
            max_threads=local_threads,
        )
        self._hold = config.server.hold_delivery
        # Postfix soft_bounce: a 5xx outcome defers instead of bouncing (expiry still bounces)
        self._soft_bounce = config.server.soft_bounce
        self.classifier = Classifier(config.bounce_rules)  # a failure's class in its log record
        self._rcpt_limits = {  # [domain."x"] recipients_per_transaction
            name.rstrip(".").lower(): pol.recipients_per_transaction
            for name, pol in config.domain.items()
            if pol.recipients_per_transaction is not None
        }
        self._max_resident = q.max_resident
        self._park_batch = max(1, min(q.park_batch, q.max_resident // 2))
        self._parking: dict[str, StoredMessage] = {}  # being written to a parked file
        self._parked_event = asyncio.Event()  # set when a park ends (operators wait on it)
        self._balancing = False  # a park or unpark task runs (one at a time)
        self._balance_after = 0.0  # nothing to park or unpark now: try again after this
        self._balance_error_until = 0.0  # a parked-file error: no parking before this time
        self._stats = EngineStats()
        self._active: dict[str, _Active] = {}
        self._held: dict[str, StoredMessage] = {}  # on hold, out of the scheduler
        self._suspended: dict[str, suspend.Suspension] = {}  # by domain (queue/suspend.py)
        self._suspension_timer: asyncio.TimerHandle | None = None  # the next one to run out
        # (lookup, bracketed, sts) -> the hosts to try, and the route MTA-STS made of the
        # domain's own (tls "verify"), if its policy is enforced. The hosts are kept as a Plan:
        # every job draws its own order of equal preferences (RFC 5321 5.1), else one order
        # would stand for a whole TTL and the other equal hosts get no mail.
        self._dest_cache: dict[tuple[str, bool, bool], tuple[Plan, Route | None]] = {}
        self._rng = random.Random()
        self._resolving: dict[tuple[str, bool, bool], list[Job]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._kicked = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._stopping = False

    # --- the API ------------------------------------------------------------------------------
    @property
    def hold(self) -> bool:
        """Delivery held: submit() still queues; nothing is sent until released."""
        return self._hold

    @hold.setter
    def hold(self, value: bool) -> None:
        self._hold = value
        if not value:
            self._kick()

    @property
    def stats(self) -> EngineStats:
        s = msgspec.structs.replace(self._stats, failures=dict(self._stats.failures))
        s.connections_opened = self.pool.stats.connections_opened
        s.reused = self.pool.stats.reused
        s.chained = self.pool.stats.chained
        s.in_memory = self.scheduler.active
        s.queued = len(self.scheduler) + len(self._parking) + self.spool.parked_count
        s.held = len(self._held)
        s.parked = self.spool.parked_count
        return s

    async def start(self, recovered: list[StoredMessage]) -> None:
        """Schedule the spool's unfinished messages (next_attempt honoured) and begin."""
        self._loop = asyncio.get_running_loop()
        self.load_suspensions()
        for sm in recovered:
            self.scheduler.add(sm, now=sm.envelope.cancelled)
        self._kick()

    def submit(self, msg: StoredMessage) -> None:
        """A message just made durable: queue it (sync, O(1)); delivered soon unless held."""
        self.scheduler.add(msg)
        self._kick()

    def flush(self) -> None:
        """Retry every deferred message now (``fastmta queue flush``)."""
        self.scheduler.flush()
        self._kick()

    # --- operator commands (fastmta/control.py); each returns False for an unknown queue id ---
    def messages(self) -> list[StoredMessage]:
        """A snapshot of the messages this engine holds: waiting, ready, in delivery, held."""
        s, live = self.scheduler, self.spool.get
        active = [a.sm for a in self._active.values()]
        every = [*s.waiting.values(), *s.backlog, *active, *self._held.values()]
        every += self._parking.values()
        return [sm for sm in every if live(sm.envelope.id) is not None]  # not deleted

    async def flush_message(self, queue_id: str) -> bool:
        """Retry this message now if it waits for a retry timer (held ones stay held). False
        for a parked one (once it is: a message being parked is waited for), which
        change_parked flushes."""
        await self._settled(queue_id)
        sm = self.scheduler.remove(queue_id)
        if sm is not None:
            sm.envelope.next_attempt = 0.0
            self.scheduler.add(sm)
            self._kick()
        return self.spool.get(queue_id) is not None

    async def hold_message(self, queue_id: str) -> bool:
        """Stop delivering this message until released; recorded in the spool (survives a
        restart). An attempt in flight finishes; the next one is not made."""
        await self._settled(queue_id)
        sm = self.spool.get(queue_id)
        if sm is None:
            return False
        if sm.envelope.hold():
            await self.spool.update(sm.envelope)
        if self.scheduler.remove(queue_id) is not None:
            self._held[queue_id] = sm  # else _activate parks it when it comes due
        return True

    async def release_message(self, queue_id: str) -> bool:
        """Undo hold: a held message is due again now. A message not held is left alone."""
        await self._settled(queue_id)
        sm = self.spool.get(queue_id)
        if sm is None:
            return False
        if sm.envelope.release():
            await self.spool.update(sm.envelope)
            if self._held.pop(queue_id, None) or self.scheduler.remove(queue_id):
                self.scheduler.add(sm)
                self._kick()
        return True

    async def delete_message(self, queue_id: str) -> bool:
        """Remove the message from the spool without a DSN (like ``postsuper -d``)."""
        await self._settled(queue_id)
        sm = self.spool.get(queue_id)
        if sm is None:
            return False
        await self.spool.done(queue_id)
        self.scheduler.remove(queue_id)
        self._held.pop(queue_id, None)
        env = sm.envelope
        if self.delivery_log is not None:  # (Postfix logs "removed")
            for rc in env.recipients:
                if rc.state in _PENDING:
                    self.delivery_log.write(
                        DeliveryRecord(
                            queue_id=queue_id,
                            recipient=rc.address,
                            site="operator",
                            text="deleted by an operator",
                            outcome="deleted",
                            attempt=env.attempts,
                        )
                    )
        return True

    async def bounce_message(self, queue_id: str, select: Selection, reason: str) -> bool:
        """Bounce the recipients of this message that ``select`` concerns (every one still to
        deliver, or those at its domains) with a DSN to the sender; the others stay queued.
        The decision is in the spool before this returns; the bounce is made as soon as the
        message is taken up (at once, held or not, unless server.hold_delivery holds all
        delivery; an attempt in flight ends first)."""
        await self._settled(queue_id)
        sm = self.spool.get(queue_id)
        if sm is None:
            return False
        env = sm.envelope
        if env.cancel(select.recipients(env), reason):
            await self.spool.update(env)
            # (an attempt in flight, or one that began meanwhile, bounces them as it ends)
            if env.id not in self._active and env.cancelled:
                taken = self._held.pop(queue_id, None) or self.scheduler.remove(queue_id)
                if taken is not None:  # else it is in the ready backlog already
                    self.scheduler.add(taken, now=True)
                self._kick()
        return True

    def load_suspensions(self) -> None:
        """(Re)read the suspended domains (``fastmta queue suspend``) from the spool root; when
        a suspension with a time limit runs out, its domain's mail is due at once."""
        root = self.config.server.spool_dir
        if not root:
            return
        now = time.time()
        try:
            self._suspended = suspend.load(root, now)
        except (OSError, ValueError) as e:
            log.error("suspended domains not (re)loaded, the previous list stays: %s", e)
            # (less the ones that ran out: the timer below must not fire for them again)
            self._suspended = {d: s for d, s in self._suspended.items() if s.active(now)}
        if self._suspension_timer is not None:
            self._suspension_timer.cancel()
            self._suspension_timer = None
        ends = [s.until for s in self._suspended.values() if s.until]
        if ends and self._loop is not None and not self._stopping:
            delay = max(0.0, min(ends) - now) + 0.01
            self._suspension_timer = self._loop.call_later(delay, self._suspensions_ran_out)

    def _suspensions_ran_out(self) -> None:
        self._suspension_timer = None
        before = set(self._suspended)
        self.load_suspensions()
        ended = before - set(self._suspended)
        if ended:
            log.info("suspension of %s ran out: delivering again", ", ".join(sorted(ended)))
            self._spawn(self._flush_ended(Selection(domains=ended)))

    async def _flush_ended(self, select: Selection) -> None:
        try:
            await self.flush_selected(select)
        except SpoolError as e:
            log.error("parked messages not flushed: %s", e)

    async def flush_selected(self, select: Selection) -> list[str]:
        """Retry now the messages ``select`` matches, in memory and parked (held ones stay
        held). Returns the queue ids found. Raises SpoolError if parked files cannot be
        rewritten."""
        found = []
        for sm in self.messages():
            if select.matches(sm.envelope) and await self.flush_message(sm.envelope.id):
                found.append(sm.envelope.id)
        rest = set(select.ids).difference(found) if select.ids else None
        if rest is None or rest:
            found += await self.change_parked("flush", rest, select)
        return found

    async def change_parked(
        self,
        action: str,
        ids: set[str] | None = None,
        select: Selection | None = None,
        reason: str = "",
    ) -> list[str]:
        """hold, release, delete, flush or bounce parked messages (those with queue ids in
        ``ids``, or all; only those ``select`` matches): their parked files are rewritten.
        Returns the queue ids found."""
        change = command_change(action, select, reason)
        found = await self.spool.change_parked(change, ids)
        self._kick()  # released or flushed messages may be due now
        return found

    async def _settled(self, queue_id: str) -> None:
        """Wait while ``queue_id`` is being written to a parked file (then it is parked)."""
        while queue_id in self._parking:
            await self._parked_event.wait()

    async def stop(self, timeout: float = 10.0) -> None:
        """Let transactions in flight finish (at most ``timeout`` s), QUIT pooled
        connections, record partial results in the spool, flush the delivery log."""
        self._stopping = True
        for timer in (self._timer, self._suspension_timer):
            if timer is not None:
                timer.cancel()
        self._timer = self._suspension_timer = None
        await self.pool.close(timeout)
        if self._tasks:
            _, pending = await asyncio.wait(list(self._tasks), timeout=timeout)
            for t in pending:
                t.cancel()
        for act in list(self._active.values()):
            try:  # recipients already final in this attempt stay final after a restart
                await self.spool.update(act.sm.envelope)
            except (KeyError, SpoolError):
                pass
        self._active.clear()
        try:
            await self.spool.flush()
        except SpoolError:
            pass
        if self.delivery_log is not None:
            self.delivery_log.flush()
        await asyncio.to_thread(self.local.close)
        if self._own_resolver:
            self.resolver.close()

    # --- scheduling ---------------------------------------------------------------------------
    def _kick(self) -> None:
        if self._kicked or self._loop is None or self._stopping:
            return
        self._kicked = True
        self._loop.call_soon(self._pump)

    def _pump(self) -> None:
        self._kicked = False
        if self._stopping:
            return
        if not self._balancing:
            self._balance()
        if self._hold:
            return
        while True:
            ready = self.scheduler.take_ready()
            if not ready:
                break
            for sm in ready:
                self._activate(sm)
        self._arm_timer()

    def _arm_timer(self) -> None:
        due = self.scheduler.next_due()
        pf = self.spool.next_parked
        if pf is not None and time.time() < pf.due < (math.inf if due is None else due):
            due = pf.due  # (one due already, waiting for room, is retried as room frees)
        if due is None or self._stopping or self._loop is None:
            return
        if self._timer is not None:
            if self._timer_at <= due:
                return
            self._timer.cancel()
        self._timer_at = due
        delay = max(0.0, due - time.time())
        self._timer = self._loop.call_later(delay + 0.001, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._pump()

    # --- parking: memory stays flat however long the queue (fastmta/spool/parked.py) ---------
    def _resident(self) -> int:
        """Queued messages with their envelopes in memory."""
        return len(self.scheduler) + len(self._held)

    def _balance(self) -> None:
        """Park when more than queue.max_resident messages are in memory; load a parked file
        when it is due and fits. Hysteresis: parking goes down to max_resident - park_batch,
        and a file is loaded only if that level is not passed, so the two never alternate.
        When a due file does not fit, messages not due yet are parked to make room (tried
        at most once a second: it scans the timers)."""
        now = time.time()
        if now < self._balance_error_until:
            return
        resident = self._resident()
        if resident > self._max_resident:
            if now >= self._balance_after:
                self._balancing = True
                self._spawn(self._park_excess())
            return
        pf = self.spool.next_parked
        if pf is None or self._hold or pf.due > now:
            return
        if (
            resident + pf.count <= self._max_resident - self._park_batch
            or now >= self._balance_after
        ):
            self._balancing = True
            self._spawn(self._load_parked())

    def _victims(self, n: int, later_than: float | None = None) -> list[StoredMessage]:
        """Up to ``n`` messages to park: held ones first (never due), then the waiting ones
        due last (after ``later_than``), then (no ``later_than``) the newest of the backlog."""
        out = []
        while self._held and len(out) < n:
            out.append(self._held.pop(next(iter(self._held))))
        if len(out) < n:
            out += self.scheduler.evict(n - len(out), later_than)
        return out

    async def _park(self, victims: list[StoredMessage]) -> bool:
        """Park ``victims`` in files of at most park_batch messages and _PARK_BYTES (latest due
        first, so each file holds neighbours in time). False after an error: the messages
        not parked are scheduled again."""
        for sm in victims:
            self._parking[sm.envelope.id] = sm
        failed = False
        try:
            for chunk in self._park_chunks(victims):
                try:
                    if not failed:
                        await self.spool.park(chunk)
                        continue
                except SpoolError as e:
                    log.error(
                        "parking %d messages on disk failed, kept in memory: %s", len(chunk), e
                    )
                    self._balance_error_until = time.time() + _BALANCE_BACKOFF
                    failed = True
                finally:
                    for sm in chunk:
                        self._parking.pop(sm.envelope.id, None)
                    self._parked_event.set()
                    self._parked_event = asyncio.Event()
                for sm in chunk:  # not parked: back where it was
                    self._requeue(sm)
        finally:
            for sm in victims:  # (cancelled by stop(): they are still in the spool's log)
                self._parking.pop(sm.envelope.id, None)
        return not failed

    def _requeue(self, sm: StoredMessage) -> None:
        """A message back in memory (loaded, or not parked after all): held, or scheduled."""
        env = sm.envelope
        if env.held and not env.cancelled:
            self._held[env.id] = sm
        else:
            self.scheduler.add(sm, now=env.cancelled)

    def _park_chunks(self, victims: list[StoredMessage]) -> list[list[StoredMessage]]:
        out: list[list[StoredMessage]] = []
        size = 0
        for sm in victims:
            if not out or len(out[-1]) >= self._park_batch or size + sm.length > _PARK_BYTES:
                out.append([])
                size = 0
            out[-1].append(sm)
            size += sm.length
        return out

    async def _park_excess(self) -> None:
        moved = False
        try:
            excess = self._resident() - (self._max_resident - self._park_batch)
            victims = self._victims(excess) if excess > 0 and not self._stopping else []
            if victims:
                moved = await self._park(victims)
            elif excess > 0:  # all of them in delivery: try again later
                self._balance_after = time.time() + 1.0
        finally:
            self._balancing = False
            if moved:
                self._kick()

    async def _load_parked(self) -> None:
        moved = False
        try:
            target = self._max_resident - self._park_batch
            while not (self._stopping or self._hold):
                pf = self.spool.next_parked
                if pf is None or pf.due > time.time():
                    break
                short = self._resident() + pf.count - target
                if short > 0:  # room from messages not due yet, if there are any
                    victims = self._victims(min(short, self._park_batch), time.time())
                    if not victims:  # all due sooner: wait for deliveries to free room
                        self._balance_after = time.time() + 1.0
                        break
                    if not await self._park(victims):
                        break
                    continue
                try:
                    loaded = await self.spool.unpark(pf)
                except SpoolError as e:
                    log.error("loading parked messages failed: %s", e)
                    self._balance_error_until = time.time() + _BALANCE_BACKOFF
                    break
                moved = True
                for sm in loaded:
                    self._requeue(sm)
        finally:
            self._balancing = False
            if moved:
                self._kick()

    def _spawn(self, coro: object) -> None:
        assert self._loop is not None
        task = self._loop.create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _activate(self, sm: StoredMessage) -> None:
        env = sm.envelope
        live = self.spool.get(env.id) is not None
        if not live or (env.held and not env.cancelled):  # deleted, or held, by an operator
            self.scheduler.finished(sm)
            if live:
                self._held[env.id] = sm
            return
        try:
            data = self.spool.read(sm)
        except SpoolError as e:
            log.error("message %s cannot be read, dropped from the queue: %s", env.id, e)
            self.scheduler.finished(sm)
            return
        act = _Active(sm, data)
        # Taken up for an operator's bounce only: held, or not due yet (its other recipients
        # keep their retry time).
        act.attempted = not env.held and (
            env.next_attempt <= 0 or env.next_attempt <= time.time() or not env.cancelled
        )
        groups = (
            batches(env, self.scheduler.recipients_per_transaction, self._rcpt_limits)
            if act.attempted
            else []
        )
        self._active[env.id] = act
        if not groups:  # nothing to send (recovered after its last result, or bounce only)
            act.jobs = 1
            self._spawn(self._job_finished(act))
            return
        act.jobs = len(groups)
        body = "8BITMIME" if env.body in ("8BITMIME", "BINARYMIME") else None
        params = None
        if any(r.notify or r.orcpt for r in env.recipients):
            params = [self._rcpt_params(env.recipients[i]) for i in range(len(env.recipients))]
        for domain, idx in groups:
            rc = env.recipients
            msg = Message(
                env.sender,
                [rc[i].address for i in idx],
                data,
                body,
                env.smtputf8,
                env.ret,
                env.envid,
                [params[i] for i in idx] if params else None,
            )
            if self._suspended and (held := suspend.suspended(self._suspended, domain)):
                job = Job(msg, None, None, act, idx, domain)  # deferred without a connection
                r = held.reply()
                self._spawn(self._on_result(job, [r] * len(idx), AttemptInfo(), "operator"))
                continue
            route = self.router.route(domain)
            job = Job(msg, None, route, act, idx, domain)
            if route.kind == "local":
                self._spawn(self._deliver_local(job))
                continue
            key = (route.lookup, route.bracketed, route.sts, route.via)  # via: errors differ
            hit = self._dest_cache.get(key)
            if hit is not None and hit[0].expires > self.resolver.clock():
                self._dispatch(job, hit[1] or route, hit[0].pick(self._rng))
            elif key in self._resolving:  # one resolution per domain at a time
                self._resolving[key].append(job)
            else:
                self._resolving[key] = [job]
                self._spawn(self._resolve(key, route))

    @staticmethod
    def _rcpt_params(r: object) -> str:
        parts = []
        if r.notify:  # type: ignore[attr-defined]
            parts.append(f"NOTIFY={r.notify}")  # type: ignore[attr-defined]
        if r.orcpt:  # type: ignore[attr-defined]
            parts.append(f"ORCPT={r.orcpt}")  # type: ignore[attr-defined]
        return " ".join(parts)

    def _dispatch(self, job: Job, route: Route, dest: Destination) -> None:
        job.destination = dest
        job.route = route
        egress = self._egress_by_domain.get(job.domain, self.egress)
        source = egress.next()
        key = egress.site_key(Router.site_key(route, dest), source)
        domain = job.domain if route.tag else None
        self.pool.site(key, lambda: limits_for(self.config, domain), source).put(job)

    async def _resolve(self, key: tuple[str, bool, bool], route: Route) -> None:
        try:
            found = await self._destination(route)
        except DnsError as e:
            found = reply(e.code, e.enhanced, e.text)
        except BaseException:
            self._resolving.pop(key, None)
            raise
        if isinstance(found, Reply):
            for job in self._resolving.pop(key, []):
                await self._on_result(job, [found] * len(job.message.recipients), AttemptInfo())
            return
        dest, sts_route = found
        # (the site stays the whole MX set's, whatever order pick() draws: one pool per site)
        plan = Plan(dest.domain, dest.site, dest.hosts, dest.expires)
        if len(self._dest_cache) > 100_000:
            self._dest_cache.clear()
        self._dest_cache[key] = (plan, sts_route)
        jobs = self._resolving.pop(key, [])
        if self._stopping:
            return
        for job in jobs:
            to = sts_route or job.route
            self._dispatch(job, to, plan.pick(self._rng))  # type: ignore[arg-type]

    async def _destination(self, route: Route) -> tuple[Destination, Route | None] | Reply:
        """The hosts to try for ``route``. For a domain's own MX hosts with an enforced MTA-STS
        policy: only those it names, and the route to them with tls "verify"; the reply that
        defers the mail when it names none. Raises DnsError."""
        dest = await Router.destination(route, self.resolver)
        if not route.sts:
            return dest, None
        applied = enforce(await self.sts.policy(route.lookup), route.lookup, dest)
        if applied is None:
            return dest, None
        if isinstance(applied, Reply):
            return applied
        return applied, msgspec.structs.replace(route, tls="verify")

    async def _deliver_local(self, job: Job) -> None:
        started = time.monotonic()
        msg = job.message
        replies = await self.local.deliver(msg.recipients, msg.data, msg.sender)
        await self._on_result(job, replies, AttemptInfo("", "", False, started), site="local")

    # --- results ------------------------------------------------------------------------------
    async def _on_result(
        self, job: Job, replies: list[Reply], info: AttemptInfo, site: str | None = None
    ) -> None:
        """Apply one transaction's per-recipient replies (called by pool workers)."""
        act: _Active = job.owner  # type: ignore[assignment]
        env = act.sm.envelope
        attempt = env.attempts + 1
        now = time.time()
        latency = time.monotonic() - info.started if info.started else 0.0
        st = self._stats
        st.attempts += 1
        dlog = self.delivery_log
        site = site if site is not None else job.site
        for i, r in zip(job.indexes, replies, strict=False):
            rc = env.recipients[i]
            text = str(r)
            if rc.state != _CANCELLED:  # (cancelled while in flight: its reason stays)
                rc.last_reply = text
            cls = ""
            if r.is_positive():
                rc.state = _DELIVERED
                outcome = "delivered"
                st.delivered += 1
                if rc.notify and wants_notice(rc.notify, "success"):
                    self._succeeded(act, Failure(i, r.code, r.enhanced, r.text), info, site)
            elif r.is_permanent() and not self._soft_bounce:
                rc.state = _BOUNCED
                outcome = "bounced"
                st.bounced += 1
                act.failures.append(Failure(i, r.code, r.enhanced, r.text, info.mx or None))
                cls = self._failed(r)
            else:
                if rc.state != _CANCELLED:  # bounced when the attempt ends (_job_finished)
                    rc.state = _DEFERRED
                outcome = "deferred"
                st.deferred += 1
                act.last[i] = (r, info.mx)
                cls = self._failed(r)
            if dlog is not None:
                dlog.write(
                    DeliveryRecord(
                        time=now,
                        queue_id=env.id,
                        recipient=rc.address,
                        site=site,
                        mx=info.mx,
                        ip=info.ip,
                        source=info.source,
                        tls=info.tls,
                        code=r.code,
                        enhanced=r.enhanced or "",
                        text=r.text,
                        latency=latency,
                        outcome=outcome,
                        attempt=attempt,
                        classification=cls,
                    )
                )
        await self._job_finished(act)

    @staticmethod
    def _succeeded(act: _Active, f: Failure, info: AttemptInfo, site: str) -> None:
        """A delivery whose NOTIFY has SUCCESS (RFC 3461 section 5.2): "delivered" into a
        mailbox here; over SMTP, NOTIFY went on to a next hop that offers DSN and the notice
        is its to make, else ours: "relayed" (section 5.2.2)."""
        if site != "local":
            if info.dsn:
                return
            f.action = "relayed"
            f.remote_mta = info.mx or None
        act.successes.append(f)

    def _failed(self, r: Reply, cls: str | None = None) -> str:
        """A failure's class (``cls``, else the classifier's), counted in stats.failures."""
        cls = cls or self.classifier.classify(r)
        failures = self._stats.failures
        failures[cls] = failures.get(cls, 0) + 1
        return cls

    async def _job_finished(self, act: _Active) -> None:
        act.jobs -= 1
        if act.jobs > 0:
            if act.checkpoint is None and self._loop is not None:
                act.checkpoint = self._loop.call_later(CHECKPOINT_AFTER, self._checkpoint, act)
            return
        if act.checkpoint is not None:
            act.checkpoint.cancel()
        sm = act.sm
        env = sm.envelope
        if act.attempted:
            env.attempts += 1
        self._active.pop(env.id, None)
        self._bounce_cancelled(act)
        pending = [i for i, r in enumerate(env.recipients) if r.state in _PENDING]
        if pending and act.attempted and self.scheduler.expired(env):
            self._expire(act, pending)
            pending = []
        reported = True
        if act.failures:
            try:
                await self._send_dsn(act, "failure")
            except SpoolError as e:
                self._unreported(act, e)
                reported = False
        if act.successes:
            try:
                await self._send_dsn(act, "success")
            except SpoolError as e:  # (delivered: a lost report beats a second delivery)
                log.error("message %s: success notice not stored: %s", env.id, e)
        slot = True  # the scheduler still counts the message as in delivery
        try:
            if reported and not pending:
                await self.spool.done(env.id)
                slot = False
                self.scheduler.finished(sm)
            elif reported and not act.attempted:  # bounce only: back to hold, or its retry time
                slot = False
                self.scheduler.finished(sm)
                await self.spool.update(env)
                self._requeue(sm)
            else:  # (the bounce not stored: its recipients are deferred, tried again then)
                slot = False
                self.scheduler.retry(sm)
                if reported:
                    await self._maybe_warn(act, pending)  # before the update, which records it
                await self.spool.update(env)
        except KeyError as e:  # removed meanwhile
            log.warning("message %s: cannot record the result: %s", env.id, e)
            if slot:
                self.scheduler.finished(sm)
        except SpoolError as e:  # a full disk, or the spool is closing
            log.warning("message %s: cannot record the result: %s", env.id, e)
            if slot:  # not marked done: the next attempt (nothing to send) tries again
                self.scheduler.retry(sm)
            elif reported and not act.attempted:
                self._requeue(sm)
        self._arm_timer()
        self._kick()

    def _checkpoint(self, act: _Active) -> None:
        """Part of a message's recipients are final while others are still in flight (a slow
        or timing-out destination): record what is known, so a crash now does not deliver the
        finished ones again (Postfix marks each recipient done as it goes). Only for messages
        still unfinished CHECKPOINT_AFTER seconds after their first batch came back: the
        common case, all batches back at once, costs no extra spool record. Not while a
        bounce is pending: a recipient recorded bounced before its DSN is stored would lose
        the DSN in a crash (the final update comes after the DSN)."""
        act.checkpoint = None  # a later batch may set another
        env = act.sm.envelope
        if self._active.get(env.id) is not act or act.jobs <= 0 or self._stopping:
            return
        if not act.failures:
            self._spawn(self._record_progress(env))

    async def _record_progress(self, env: Envelope) -> None:
        try:
            await self.spool.update(env)
        except (KeyError, SpoolError) as e:  # removed meanwhile, or a full disk: the final
            log.warning("message %s: cannot record progress: %s", env.id, e)  # update will

    def _unreported(self, act: _Active, e: SpoolError) -> None:
        """The bounce could not be stored (a full disk): its recipients are not final without
        it. As Postfix does on a "bounce or trace service failure", they are deferred (an
        operator's bounce stays pending) and the next attempt bounces them again, so neither
        the notice nor the message's other recipients are lost."""
        env = act.sm.envelope
        log.error("message %s: bounce not stored, tried again later: %s", env.id, e)
        text = f"bounce notice not stored, tried again later: {e}"
        for f in act.failures:
            rc = env.recipients[f.index]
            rc.state = _CANCELLED if f.index in act.cancelled else _DEFERRED
            self._stats.bounced -= 1
            self._stats.deferred += 1
            self._log_outcome(env, rc.address, f, text, "deferred")
        act.failures = []

    def _bounce_cancelled(self, act: _Active) -> None:
        """Recipients an operator bounced (`fastmta queue bounce`) fail now: in this DSN."""
        for i, rc in enumerate(act.sm.envelope.recipients):
            if rc.state == _CANCELLED:
                act.cancelled.add(i)
                text = rc.last_reply or bounce_reason("")
                self._fail(act, Failure(i, 550, "5.0.0", text), "bounced", text, "operator")

    def _expire(self, act: _Active, pending: list[int]) -> None:
        """queue.max_lifetime is over: the still-deferred recipients bounce (RFC 5321 4.5.4.1)."""
        env = act.sm.envelope
        for i in pending:
            r, mx = act.last.get(i, (None, ""))
            if r is not None:
                f = Failure(i, r.code, r.enhanced, r.text, mx or None)
            else:
                f = Failure(
                    i, 451, "4.4.7", env.recipients[i].last_reply or "Delivery time expired"
                )
            lifetime = self.config.queue.max_lifetime
            self._fail(act, f, "expired", f"message expired after {lifetime:g}s: {f.text}")

    def _fail(self, act: _Active, f: Failure, outcome: str, text: str, site: str = "") -> None:
        """Recipient ``f.index`` bounces without an attempt (expired, or an operator's
        bounce): in this attempt's DSN, counted, and one delivery-log line."""
        env = act.sm.envelope
        rc = env.recipients[f.index]
        rc.state = _BOUNCED
        act.failures.append(f)
        self._stats.bounced += 1
        expired = "MessageExpired" if outcome == "expired" else None
        cls = self._failed(reply(f.code, f.enhanced, f.text), expired)
        self._log_outcome(env, rc.address, f, text, outcome, site, cls)

    def _log_outcome(
        self,
        env: Envelope,
        recipient: str,
        f: Failure,
        text: str,
        outcome: str,
        site: str = "",
        cls: str = "",
    ) -> None:
        """A delivery-log line for an outcome reached without an attempt of this recipient."""
        if self.delivery_log is not None:
            self.delivery_log.write(
                DeliveryRecord(
                    time=time.time(),
                    queue_id=env.id,
                    recipient=recipient,
                    site=site,
                    code=f.code,
                    enhanced=f.enhanced or "",
                    text=text,
                    outcome=outcome,
                    attempt=env.attempts,
                    classification=cls,
                )
            )

    async def _send_dsn(self, act: _Active, kind: str, pending: list[int] | None = None) -> None:
        env = act.sm.envelope
        if kind == "failure":
            failures = act.failures
        elif kind == "success":
            failures = act.successes
        else:
            failures = []
            for i in pending or ():
                r, mx = act.last.get(i, (None, ""))
                if r is not None:
                    failures.append(Failure(i, r.code, r.enhanced, r.text, mx or None))
                else:
                    failures.append(Failure(i, 451, "4.0.0", env.recipients[i].last_reply or ""))
        made = make_dsn(
            env,
            failures,
            act.data,
            reporting_mta=self.hostname,
            kind=kind,  # type: ignore[arg-type]
            retry_until=env.arrival + self.scheduler.schedule.max_lifetime,
        )
        if made is None:
            return
        dsn_env, data = made
        signer = self.dkim.for_message(data) if self.dkim is not None else None
        if signer is not None:
            data = signer.sign(data) + data
        stored = await self.spool.store(dsn_env, data)  # durable before the original moves on
        self._stats.dsns += 1
        if self.delivery_log is not None:
            self.delivery_log.write(ReceptionRecord.of(stored.envelope, "dsn", origin=env.id))
        self.submit(stored)

    async def _maybe_warn(self, act: _Active, pending: list[int]) -> None:
        env = act.sm.envelope
        warn_after = self.config.queue.delay_warning
        if not self.scheduler.schedule.delay_warning_due(
            env.arrival, time.time(), env.warned, warn_after
        ):
            return
        try:
            await self._send_dsn(act, "delay", pending)
        except SpoolError as e:  # not warned: the next attempt tries again
            log.error("message %s: delay notice not stored: %s", env.id, e)
            return
        env.warned = True  # in the spool with the update that follows: once, across restarts
