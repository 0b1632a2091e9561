"""The connection pool: per-site ready queues served by connection workers.

Each site (a set of MX hosts, see routing.py) has a FIFO of jobs (one transaction each) and up
to ``SiteLimits.max_connections`` worker tasks. A worker owns one connection at a time: it takes
a job, connects if it has no usable connection (MX hosts and their addresses in order, the next
one on a connect failure, a 4xx/5xx greeting, 421, or a TLS failure), runs the transaction,
hands the replies to ``on_result``, and takes the next job over the same connection (the client
session sends RSET when needed). A 421 to a fresh connection's first transaction, before the
server took the message for anyone, is a failure of that host too: the job goes on to the
hosts and addresses after it, each once, and is deferred with the last reply when all fail;
over a connection that carried mail before, it goes once more over a fresh connection.
While a job's content is going out, the next queued job is chained behind it
(``SiteLimits.chain``: its MAIL/RCPT/DATA leave with the previous ".", so a backlog costs one
round trip per message, not two); a site whose server drops a chained transaction unanswered
(closes, or never answers its MAIL) stops chaining, and a job whose MAIL was never answered (a
chained one, or the first over a reused connection, which may have died silently) is queued once
more instead of counted as an attempt.

How many connections work: a queued job waits for a worker already at work (starting, woken,
or, on a chaining site, busy with a transaction it will chain the job to) as long as there are
at most a *backlog* of queued jobs per such worker; beyond that, put() wakes the most recently
idle worker (so surplus connections stay idle and time out) or starts a new one. The backlog
is what a worker chains within ``SiteLimits.chain_wait``: that time over the site's recent
transaction time (an average, send to final reply), 1 to ``SiteLimits.backlog``. A fast
server (or a busy loop here, where more connections would only cost CPU) takes a burst over a
few connections; a slow one gets a connection per queued job up to the site's limit, as
Postfix would. Chaining a job costs one round trip and no set-up (KumoMTA also sizes its
connection count by the ready queue). A site whose server does not offer PIPELINING does not
chain, and spreads its jobs over idle workers.

With no job, a connected worker waits ``idle_timeout``
seconds, then says QUIT (Postfix smtp_connection_cache_time_limit). A connection is retired after
``messages_per_connection`` transactions. The per-site rate limit is a token bucket. A site
whose last worker has ended with nothing queued is dropped (KumoMTA reaps idle queues too).

When every address of a site fails and no other worker of the site holds a live connection, the
site is unreachable: every job queued for it fails with the same reply at once (Postfix marks
the destination dead) instead of each waiting through the same connect timeouts.

Hot path: one ``deque`` append and (when a worker idles) one future wake-up per job; no task
per message.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable

import msgspec

from fastmta.delivery.egress import Source
from fastmta.delivery.routing import Route
from fastmta.delivery.smtp import ConnectError, SmtpConnection, Timeouts, open_connection
from fastmta.dns import Destination
from fastmta.protocol.client import NO_RESPONSE, Message, TransactionResult
from fastmta.protocol.replies import Reply, reply
from fastmta.queue.limits import SiteLimits
from fastmta.tls import shared_client_context

__all__ = ["AttemptInfo", "ConnectionPool", "Job", "PoolStats", "SitePool"]

log = logging.getLogger("fastmta.delivery")

NO_HOSTS = reply(451, "4.4.4", "No mail exchanger address to try")
FIRST_BACKLOG = 4  # jobs per working connection before the site's transaction time is known
TX_TIME_WEIGHT = 0.125  # of each new transaction time in the site's average (like TCP's SRTT)
STOPPING = reply(451, "4.3.2", "Delivery is stopping")


class AttemptInfo(msgspec.Struct, gc=False):
    """Where a transaction went (for the delivery log)."""

    mx: str = ""
    ip: str = ""
    tls: bool = False
    started: float = 0.0  # time.monotonic() when the attempt began
    source: str = ""  # the local address it went out from ("" = the OS's choice)
    dsn: bool = True  # the next hop offered DSN: NOTIFY went on, its notices are its own


class Job:
    """One transaction to make: ``message`` to ``destination`` via ``route``. ``owner`` and
    ``indexes`` belong to the caller (which message, which recipients)."""

    __slots__ = ("message", "destination", "route", "owner", "indexes", "domain", "site", "retried")

    def __init__(
        self,
        message: Message,
        destination: Destination | None,
        route: Route | None,
        owner: object,
        indexes: list[int],
        domain: str,
    ) -> None:
        self.message = message
        self.destination = destination
        self.route = route
        self.owner = owner
        self.indexes = indexes
        self.domain = domain
        self.site = ""
        self.retried = False  # sent once over a connection that died before answering


ResultHandler = Callable[[Job, list[Reply], AttemptInfo], Awaitable[None]]


def _site_failed(result: TransactionResult) -> bool:
    """The server closed with 421 (RFC 5321 3.8) before it took the message for anyone: every
    recipient got that 421 (MAIL refused, or the connection closed before any RCPT was
    answered or before the content was accepted). Postfix takes a 421 as a failure of the
    host, not of the message, and tries the next MX host."""
    rcpts = result.rcpts
    return bool(rcpts) and result.data is None and all(r.code == 421 for r in rcpts)


class PoolStats(msgspec.Struct):
    connections_opened: int = 0
    reused: int = 0  # transactions over a connection that had carried one before
    chained: int = 0  # of reused: sent with the end of the previous one (no round trip)
    connect_failures: int = 0


def _idle_expired(fut: asyncio.Future[bool]) -> None:
    if not fut.done():
        fut.set_result(False)


class SitePool:
    """Ready queue and workers of one site (see the module docstring)."""

    def __init__(
        self, pool: ConnectionPool, key: str, limits: SiteLimits, source: Source | None = None
    ) -> None:
        self.pool = pool
        self.key = key
        self.limits = limits
        self.source = source  # the egress source its connections come from (None: the pool's)
        self._source_ip = (source.address if source else pool.source_address) or ""
        self.queue: deque[Job] = deque()
        self.workers: set[asyncio.Task[None]] = set()
        self._idle: deque[asyncio.Future[bool]] = deque()
        self._loop = asyncio.get_running_loop()
        self._starting = 0  # workers started that have not yet asked for a job
        self._woken = 0  # idle workers woken by put() that have not yet run
        self.connected = 0  # workers holding a live connection
        self.busy = 0  # workers between taking a job and handling its (and chained) results
        # the site's policy; off once its server lost a chained transaction
        self.chaining = limits.chain
        self.tx_time = 0.0  # average seconds from sending a transaction to its result; 0: none yet
        self._backlog = min(FIRST_BACKLOG, limits.backlog)  # jobs per working worker (chaining)

    def put(self, job: Job) -> None:
        """Queue a job, and put another worker to work if it is needed."""
        job.site = self.key
        self.queue.append(job)
        self._staff()

    def _staff(self) -> None:
        """Put workers to work until those at work will take every queued job soon (see the
        module docstring): the most recently idle first, then new ones (connection limit)."""
        queue = self.queue
        idle = self._idle
        while True:
            working = self._starting + self._woken  # each takes a queued job first thing
            if self.chaining:
                # a busy worker chains the next job to its current one: a backlog each
                working = (working + self.busy) * self._backlog
            if len(queue) <= working:
                return
            while idle:
                w = idle.pop()
                if not w.done():  # (a done one timed out; its worker has not run yet)
                    w.set_result(True)
                    self._woken += 1
                    break
            else:
                if not self.limits.can_open() or self.pool.closing:
                    return
                self._spawn()

    def _timed(self, started: float) -> None:
        """Fold one transaction's time into the site's average; size the backlog from it."""
        t = time.monotonic() - started
        avg = self.tx_time
        avg = self.tx_time = t if not avg else avg + TX_TIME_WEIGHT * (t - avg)
        limits = self.limits
        n = int(limits.chain_wait / avg) if avg > 0 else limits.backlog
        n = 1 if n < 1 else limits.backlog if n > limits.backlog else n
        if n < self._backlog and self.queue:
            self._backlog = n
            self._staff()  # a slower site: the queue may need more connections now
        else:
            self._backlog = n

    def _stop_chaining(self) -> None:
        """No more chaining for this site: queued jobs no longer wait for busy workers."""
        self.chaining = False
        self._staff()

    def _spawn(self) -> None:
        self.limits.opened()
        self._starting += 1
        task = self._loop.create_task(self._worker())
        self.workers.add(task)
        task.add_done_callback(self.workers.discard)

    async def _next_job(self, connected: bool) -> Job | None:
        """The next job; a connected worker waits up to idle_timeout for one."""
        while not self.queue:
            if not connected or self.pool.closing:
                return None
            # A future and one timer, not asyncio.wait_for: this runs once per message when
            # the site's queue drains as fast as it fills (wait_for wraps and looks up the loop).
            loop = self._loop
            fut = loop.create_future()
            idle = self._idle
            idle.append(fut)
            timer = loop.call_later(self.pool.idle_timeout, _idle_expired, fut)
            try:
                woken = await fut
            finally:
                timer.cancel()
                if fut.done() and not fut.cancelled() and fut.result():
                    self._woken -= 1  # put() popped it
                elif fut in idle:  # expired, or the pool is closing
                    idle.remove(fut)
            if not woken:
                return None
        return self.queue.popleft()

    async def _worker(self) -> None:
        pool = self.pool
        conn: SmtpConnection | None = None
        # sent over conn, result not yet handled: (job, info, chained)
        inflight: deque[tuple[Job, AttemptInfo, bool]] = deque()
        # a job whose first transaction got 421, taken out of inflight, not yet sent again
        failover: tuple[Job, AttemptInfo, TransactionResult] | None = None
        first = True
        busy = False
        try:
            while not pool.closing:
                if busy:
                    self.busy -= 1
                    busy = False
                job = await self._next_job(conn is not None)
                if first:
                    self._starting -= 1
                    first = False
                if job is None:
                    break
                self.busy += 1
                busy = True
                await self._rate_limit()
                if conn is not None and not conn.usable:
                    self._drop(conn)
                    conn = None
                reused = conn is not None
                if conn is None:
                    try:
                        conn = await pool.connect(job, self.source)
                    except ConnectError as e:
                        await self._unreachable(job, e.reply)
                        continue
                    self._connected(conn, inflight)
                else:
                    pool.stats.reused += 1
                while True:
                    inflight.append((job, self._attempt(conn), False))
                    conn.send(job.message)
                    failover = await self._results(conn, inflight, reused)
                    if failover is None:
                        break
                    # the server said 421 to a fresh connection's first transaction: the next
                    # host or address, each at most once (pool.connect starts after this one)
                    self._drop(conn)
                    conn = None
                    job, info, result = failover
                    try:
                        conn = await pool.connect(job, self.source, after=(info.mx, info.ip))
                    except ConnectError as e:
                        if e.reply is NO_HOSTS or e.loops_back:
                            # none left (or the rest are no better than us): the 421 it is
                            await pool.on_result(job, result.rcpts, info)
                        else:  # every host left failed too: the last one's reason
                            pool.stats.connect_failures += 1
                            info = AttemptInfo("", "", False, time.monotonic(), self._source_ip)
                            await pool.on_result(job, [e.reply] * len(job.message.recipients), info)
                        failover = None
                        break
                    failover = None
                    reused = False
                    self._connected(conn, inflight)
                if conn is not None and (
                    not conn.usable or self.limits.connection_spent(conn.transactions)
                ):
                    self._drop(conn)
                    conn = None
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug must not leave the site without workers forever
            log.exception("delivery worker for %s failed", self.key)
            # sent, outcome unknown: once more (at least once) rather than never finished
            self.queue.extendleft(job for job, _, _ in reversed(inflight))
            inflight.clear()
            if failover is not None:
                self.queue.appendleft(failover[0])
        finally:
            if first:
                self._starting -= 1
            if busy:
                self.busy -= 1
            if conn is not None:
                self._drop(conn)
            self.limits.closed()
            if self.queue and not pool.closing and self.limits.can_open():
                self._spawn()
            elif not self.queue and not self._starting and len(self.workers) <= 1:
                pool.reap(self)

    def _attempt(self, conn: SmtpConnection) -> AttemptInfo:
        """Where a transaction sent now over ``conn`` goes (for the log and DSNs)."""
        return AttemptInfo(
            conn.host,
            conn.ip,
            conn.tls,
            time.monotonic(),
            self._source_ip,
            conn.session.capabilities.dsn,
        )

    def _connected(
        self, conn: SmtpConnection, inflight: deque[tuple[Job, AttemptInfo, bool]]
    ) -> None:
        """A new connection of this worker: count it, and chain over it if the site may."""
        self.connected += 1
        if self.chaining and not conn.session.pipelining:
            self._stop_chaining()  # the server does not pipeline
        if self.chaining:
            conn.chain = self._chainer(conn, inflight)

    async def _results(
        self, conn: SmtpConnection, inflight: deque[tuple[Job, AttemptInfo, bool]], reused: bool
    ) -> tuple[Job, AttemptInfo, TransactionResult] | None:
        """Hand every transaction sent over ``conn`` to on_result, oldest first. Returns the
        first transaction of a fresh connection instead when the server said 421 to all of
        it (see _site_failed): the caller tries it at the next host."""
        pool = self.pool
        failover = None
        while inflight:
            job, info, chained = inflight[0]
            result = await conn.result(job.message)
            inflight.popleft()
            if result.mail is not NO_RESPONSE:
                self._timed(info.started)
            if result.mail is NO_RESPONSE and not conn.usable and not job.retried:
                # the connection died (closed, or silent until a timeout) before the
                # server answered this MAIL
                if chained and self.chaining:
                    self._stop_chaining()  # it lost a chained one: no more for this site
                    log.warning(
                        "site %s (%s[%s]): a transaction sent with the previous one's "
                        "final dot got no answer; no more chained transactions to it",
                        self.key, conn.host, conn.ip,
                    )  # fmt: skip
                if chained or reused:
                    # not a real attempt: once more over a fresh connection (Postfix
                    # does the same for a cached connection)
                    job.retried = True
                    self.queue.appendleft(job)
                    continue
            if _site_failed(result):
                if not chained and not reused:
                    failover = (job, info, result)
                    continue
                if not job.retried:
                    # the server ends a connection that carried mail before (a limit of
                    # messages per connection, or it is going down): not this message's
                    # attempt; once more over a fresh connection, where a 421 counts
                    job.retried = True
                    self.queue.appendleft(job)
                    continue
            await pool.on_result(job, result.rcpts, info)
        return failover

    def _chainer(
        self, conn: SmtpConnection, inflight: deque[tuple[Job, AttemptInfo, bool]]
    ) -> Callable[[], Message | None]:
        """The connection's chain hook: the next queued job's message, when it may go now."""
        limits = self.limits
        queue = self.queue

        def chain() -> Message | None:
            if not queue or not self.chaining or self.pool.closing:
                return None
            job = queue[0]
            if (
                limits.connection_spent(conn.transactions)
                or conn.session.refusal(job.message) is not None
                or limits.try_send() > 0
            ):
                return None
            queue.popleft()
            inflight.append((job, self._attempt(conn), True))
            self.pool.stats.reused += 1
            self.pool.stats.chained += 1
            return job.message

        return chain

    def _drop(self, conn: SmtpConnection) -> None:
        conn.close(quit=True)
        self.connected -= 1

    async def _rate_limit(self) -> None:
        delay = self.limits.try_send()
        while delay > 0:
            await asyncio.sleep(delay)
            delay = self.limits.try_send()

    async def _unreachable(self, job: Job, r: Reply) -> None:
        """Every address failed: fail this job, and the queued ones if no one is connected."""
        self.pool.stats.connect_failures += 1
        info = AttemptInfo("", "", False, time.monotonic())
        failed = [job]
        if self.connected == 0:
            failed.extend(self.queue)
            self.queue.clear()
        for j in failed:
            await self.pool.on_result(j, [r] * len(j.message.recipients), info)


class ConnectionPool:
    """All sites' queues and workers. ``on_result(job, replies, info)`` is awaited by the
    worker for every finished transaction (replies in the order of job.message.recipients)."""

    def __init__(
        self,
        on_result: ResultHandler,
        *,
        helo_name: str,
        timeouts: Timeouts | None = None,
        idle_timeout: float = 30.0,
        tls_context: ssl.SSLContext | None = None,
        ca_file: str | None = None,
        source_address: str | None = None,
        max_addresses: int = 10,
        use_pipelining: bool = True,
        use_chunking: bool = True,
    ) -> None:
        self.on_result = on_result
        self.helo_name = helo_name
        self.timeouts = timeouts or Timeouts()
        self.idle_timeout = idle_timeout
        self.tls_context = tls_context
        self.ca_file = ca_file  # CAs for routes whose tls is "verify" (None: the system's)
        self.source_address = source_address or None
        self.max_addresses = max_addresses  # Postfix smtp_mx_address_limit-like bound
        self.use_pipelining = use_pipelining
        self.use_chunking = use_chunking
        self.sites: dict[str, SitePool] = {}
        self.stats = PoolStats()
        self.closing = False

    def site(
        self, key: str, limits: Callable[[], SiteLimits], source: Source | None = None
    ) -> SitePool:
        sp = self.sites.get(key)
        if sp is None:
            sp = self.sites[key] = SitePool(self, key, limits(), source)
        return sp

    def reap(self, sp: SitePool) -> None:
        """Forget a site whose last worker ended with nothing queued (idle timeout): a
        sender reaching millions of domains keeps only the sites it is talking to. Its
        token bucket goes too; a new one starts full, as after any idle period."""
        if self.sites.get(sp.key) is sp:
            del self.sites[sp.key]

    async def connect(
        self, job: Job, source: Source | None = None, after: tuple[str, str] | None = None
    ) -> SmtpConnection:
        """Open a connection for ``job`` (from ``source``, else the pool's address and EHLO
        name): hosts in order, each host's addresses in order. ``after`` (host, address): only
        the addresses after that one (it said 421 to the job); they count towards
        ``max_addresses`` as if tried. Raises ConnectError(NO_HOSTS) when none is left."""
        dest, route = job.destination, job.route
        assert dest is not None and route is not None
        last: ConnectError | None = None
        tried = 0
        skipping = after is not None
        for mx in dest.hosts:
            for ip in mx.addresses:
                if tried >= self.max_addresses:
                    break
                tried += 1
                if skipping:
                    skipping = (mx.name, ip) != after
                    continue
                try:
                    conn = await self._open(mx.name, ip, route, route.tls, source)
                except ConnectError as e:
                    if e.loops_back:
                        # we are this MX: the hosts after it are no better than us (a backup
                        # MX hands mail only to more preferred ones; Postfix does the same);
                        # a better host's transient failure means try again later
                        raise last or e from None
                    last = e
                    if not (e.tls_failed and route.tls == "opportunistic"):
                        continue
                    try:  # the handshake failed: this host once more in clear (Postfix)
                        conn = await self._open(mx.name, ip, route, "none", source)
                    except ConnectError as e2:
                        last = e2
                        continue
                self.stats.connections_opened += 1
                return conn
        raise last or ConnectError(NO_HOSTS)

    async def _open(
        self, host: str, ip: str, route: Route, tls: str, source: Source | None
    ) -> SmtpConnection:
        return await open_connection(
            host,
            ip,
            route.port,
            helo_name=source.helo_name if source else self.helo_name,
            timeouts=self.timeouts,
            tls=tls,
            tls_context=(
                shared_client_context(True, self.ca_file) if tls == "verify" else self.tls_context
            ),
            source_address=source.address if source else self.source_address,
            auth=route.auth,
            use_pipelining=self.use_pipelining,
            use_chunking=self.use_chunking,
        )

    def queued(self) -> int:
        return sum(len(s.queue) for s in self.sites.values())

    async def close(self, timeout: float = 10.0) -> list[Job]:
        """Stop: let transactions in flight finish (at most ``timeout`` s), QUIT idle
        connections, cancel the rest. Returns the jobs that were queued but never started."""
        self.closing = True
        left: list[Job] = []
        for sp in self.sites.values():
            left.extend(sp.queue)
            sp.queue.clear()
            for w in sp._idle:
                if not w.done():
                    w.set_result(False)
        tasks = [t for sp in self.sites.values() for t in sp.workers]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        return left
