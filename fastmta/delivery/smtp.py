"""One SMTP connection to one mail exchanger: the asyncio adapter around the sans-IO
:class:`~fastmta.protocol.client.ClientSession`, with per-phase timeouts, STARTTLS and AUTH.

:func:`open_connection` connects, reads the greeting, says EHLO, negotiates TLS per policy and
authenticates (smarthost only). :meth:`SmtpConnection.send` starts a transaction and
:meth:`SmtpConnection.result` waits for the oldest one's per-recipient replies. The pool
(pool.py) decides which host and when to reuse. When the pool sets
:attr:`SmtpConnection.chain`, it is asked for the next message right after a message's
content has been handed to the transport, so the next transaction travels with the end of
the previous one (see the client session's "chained transactions").

Timeouts are RFC 5321 section 4.5.3.2's, chosen by ``ClientSession.phase`` and re-armed
whenever the server sends anything; a write that cannot drain (the server stopped reading)
gets ``data_block`` (4.5.3.2.5). A timeout aborts the connection and the transaction's
recipients get ``451 4.4.2`` (transient: retried later).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable

import msgspec

from fastmta.config import DeliveryConfig
from fastmta.delivery.routing import is_ip, is_loopback
from fastmta.protocol.client import (
    NO_RESPONSE,
    Authenticated,
    ClientEvent,
    ClientSession,
    Closed,
    Failed,
    Message,
    Phase,
    Ready,
    StartTLS,
    TransactionResult,
)
from fastmta.protocol.replies import Reply, reply
from fastmta.tls import shared_client_context

__all__ = ["ConnectError", "SmtpConnection", "Timeouts", "open_connection"]

# RFC 3463 3.8 X.7.5 "cryptographic failure"; a transient code so the queue retries.
TLS_NOT_OFFERED = reply(451, "4.7.5", "TLS is required but the server does not offer STARTTLS")
TLS_FAILED = "TLS is required but the TLS handshake failed"
AUTH_NOT_SECURE = reply(451, "4.7.0", "Refusing to send AUTH credentials without TLS")


class Timeouts(msgspec.Struct, frozen=True):
    """Seconds per phase (RFC 5321 4.5.3.2); the defaults are the RFC's minimums."""

    connect: float = 30.0
    greeting: float = 300.0  # 4.5.3.2.1
    mail: float = 300.0  # 4.5.3.2.2 (also EHLO, STARTTLS, RSET, AUTH, QUIT)
    rcpt: float = 300.0  # 4.5.3.2.3
    data: float = 120.0  # 4.5.3.2.4
    data_block: float = 180.0  # 4.5.3.2.5
    data_done: float = 600.0  # 4.5.3.2.6

    @classmethod
    def from_config(cls, d: DeliveryConfig) -> Timeouts:
        return cls(
            d.connect_timeout,
            d.greeting_timeout,
            d.mail_timeout,
            d.rcpt_timeout,
            d.data_timeout,
            d.data_block_timeout,
            d.data_done_timeout,
        )

    def for_phase(self, phase: Phase) -> float:
        if phase is Phase.GREETING:
            return self.greeting
        if phase is Phase.RCPT:
            return self.rcpt
        if phase is Phase.DATA:
            return self.data
        if phase is Phase.DATA_DONE:
            return self.data_done
        return self.mail


class ConnectError(Exception):
    """Connecting to one address failed; ``reply`` says why (transient unless the server
    said 5xx after its greeting, or it is ourselves). ``tls_failed``: the STARTTLS handshake
    failed (opportunistic: retry in clear)."""

    def __init__(self, r: Reply, *, tls_failed: bool = False) -> None:
        super().__init__(str(r))
        self.reply = r
        self.tls_failed = tls_failed

    @property
    def loops_back(self) -> bool:
        """The host is this MTA itself (RFC 3463 X.4.6, see ClientSession._is_myself)."""
        return self.reply.enhanced == "5.4.6"


class SmtpConnection(asyncio.Protocol):
    """An established (or establishing) connection; use :func:`open_connection`."""

    def __init__(self, session: ClientSession, timeouts: Timeouts, host: str, ip: str) -> None:
        self.session = session
        self.timeouts = timeouts
        self.host = host  # MX host name (for logs and SNI)
        self.ip = ip
        self.tls = False
        self.transactions = 0  # transactions started on this connection
        # asked for a message to chain when the session can_chain (None: never chain)
        self.chain: Callable[[], Message | None] | None = None
        self.transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0  # when self._timer fires (loop time)
        self._deadline: float | None = None  # when the phase's timeout runs out (loop time)
        self._timed_out: Phase | None = None
        self._closed = False
        self._paused = False
        self._made: asyncio.Future[None] = self._loop.create_future()

    # --- asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if not self._made.done():
            self._made.set_result(None)
        self._arm()

    def data_received(self, data: bytes) -> None:
        session = self.session
        session.receive(data)
        if self.chain is not None and session.can_chain:
            msg = self.chain()
            if msg is not None:
                self._start(msg)
        self._flush()
        self._arm()
        if session.has_event:  # e.g. not after a 354, which only lets the session send the body
            self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._disarm()
        self.session.connection_lost()
        self._wake()

    def pause_writing(self) -> None:
        self._paused = True
        self._arm()

    def resume_writing(self) -> None:
        self._paused = False
        self._arm()

    # --- state --------------------------------------------------------------------------------
    @property
    def usable(self) -> bool:
        """True when another transaction may start on this connection."""
        return not self._closed and self.session.phase is Phase.IDLE

    def close(self, quit: bool = True) -> None:
        """QUIT (best effort, without waiting for the 221) and close."""
        if self.transport is None or self._closed:
            return
        if quit and self.session.phase is Phase.IDLE:
            self.session.quit()
            self._flush()
        self._disarm()
        self.transport.close()
        self._closed = True

    def abort(self) -> None:
        self._disarm()
        if self.transport is not None:
            self.transport.abort()
        self._closed = True

    # --- the conversation ---------------------------------------------------------------------
    def send(self, msg: Message) -> None:
        """Start a transaction (IDLE phase only); :meth:`result` returns its outcome."""
        self._start(msg)
        self._flush()
        self._arm()

    def _start(self, msg: Message) -> None:
        self.session.send(msg)
        self.transactions += 1

    async def result(self, msg: Message) -> TransactionResult:
        """The outcome of the oldest transaction sent (``msg``). Never raises for SMTP-level
        failures: a lost connection or timeout becomes transient replies for every recipient
        not yet final; ``mail`` is ``NO_RESPONSE`` when the server never answered the MAIL."""
        while True:
            ev = await self.next_event()
            if isinstance(ev, TransactionResult):
                if self._timed_out is not None:
                    ev = self._timeout_result(ev)
                return ev
            if isinstance(ev, Failed | Closed):
                # a failure without a result: nothing of this message was answered
                r = self._failure_reply(ev.reply if isinstance(ev, Failed) else NO_RESPONSE)
                return TransactionResult(r, [r] * len(msg.recipients), None)

    async def next_event(self) -> ClientEvent:
        """The next session event, waiting (with the phase's timeout armed) as needed."""
        while True:
            ev = self.session.next_event()
            if ev is not None:
                if self._timed_out is not None and isinstance(ev, Failed):
                    ev = Failed(self._failure_reply(ev.reply), ev.phase)
                return ev
            if self._closed:
                return Failed(self._failure_reply(NO_RESPONSE), self.session.phase)
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def start_tls(self, context: ssl.SSLContext, server_hostname: str | None) -> None:
        """Upgrade after the server's 220 to STARTTLS (RFC 3207 4.2). Raises ConnectError."""
        self._disarm()
        try:
            transport = await asyncio.wait_for(
                self._loop.start_tls(
                    self.transport,
                    self,
                    context,
                    server_hostname=server_hostname,
                    ssl_handshake_timeout=self.timeouts.mail,
                ),
                self.timeouts.mail + 1,
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as e:
            self.abort()
            raise ConnectError(
                reply(451, "4.7.5", f"{TLS_FAILED}: {e or type(e).__name__}"), tls_failed=True
            ) from None
        self.transport = transport  # type: ignore[assignment]
        self.tls = True
        self.session.tls_started()
        self._flush()
        self._arm()

    async def authenticate(self, username: str, password: str) -> None:
        """AUTH through the client session (RFC 4954); raises ConnectError when refused."""
        self.session.authenticate(username, password)
        self._flush()
        self._arm()
        ev = await self.next_event()
        if not isinstance(ev, Authenticated):
            why = ev.reply if isinstance(ev, Failed) else NO_RESPONSE
            # RFC 4954 6: 535 bad credentials; defer (like Postfix) rather than bounce mail
            raise ConnectError(reply(451, "4.7.0", f"Authentication failed: {why}"))

    # --- internals ----------------------------------------------------------------------------
    def _flush(self) -> None:
        out = self.session.data_to_send()
        if out and self.transport is not None and not self._closed:
            self.transport.write(out)

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _arm(self, seconds: float | None = None) -> None:
        """Restart the timeout of the current phase (or ``seconds``); none while IDLE.

        Called on every reply, so it only moves a deadline: the one timer is re-created when
        it would fire too late, and otherwise re-armed by _on_timer for the time left."""
        if self._closed:
            return
        if seconds is None:
            phase = self.session.phase
            if phase is Phase.IDLE or phase is Phase.CLOSED:
                self._deadline = None
                return
            seconds = self.timeouts.data_block if self._paused else self.timeouts.for_phase(phase)
        deadline = self._deadline = self._loop.time() + seconds
        timer = self._timer
        if timer is not None:
            if self._timer_at <= deadline:
                return
            timer.cancel()
        self._timer_at = deadline
        self._timer = self._loop.call_at(deadline, self._on_timer)

    def _disarm(self) -> None:
        self._deadline = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        deadline = self._deadline
        if deadline is None or self._closed:
            return
        if self._loop.time() < deadline:  # moved on since the timer was set
            self._timer_at = deadline
            self._timer = self._loop.call_at(deadline, self._on_timer)
            return
        self._timed_out = self.session.phase
        if self.transport is not None:
            self.transport.abort()  # connection_lost() follows and fails what is in flight

    def _failure_reply(self, r: Reply) -> Reply:
        if self._timed_out is not None and r is NO_RESPONSE:
            return reply(451, "4.4.2", f"Timeout waiting for the {self._timed_out.value} reply")
        return r

    def _timeout_result(self, ev: TransactionResult) -> TransactionResult:
        """The recipients get the timeout reply; ``mail`` stays NO_RESPONSE when the MAIL was
        never answered (the pool may then try the message over another connection)."""
        return TransactionResult(
            ev.mail if ev.mail is NO_RESPONSE else self._failure_reply(ev.mail),
            [self._failure_reply(r) for r in ev.rcpts],
            self._failure_reply(ev.data) if ev.data is not None else None,
        )


async def open_connection(
    host: str,
    ip: str,
    port: int,
    *,
    helo_name: str,
    timeouts: Timeouts,
    tls: str = "opportunistic",
    tls_context: ssl.SSLContext | None = None,
    source_address: str | None = None,
    auth: tuple[str, str] | None = None,
    use_pipelining: bool = True,
    use_chunking: bool = True,
) -> SmtpConnection:
    """Connect to ``ip``:``port`` (MX ``host``) and get to a state ready for transactions.

    ``tls``: "none" never STARTTLS; "opportunistic" when offered; "required": no STARTTLS or a
    failed handshake raises ConnectError 451 4.7.5; "verify": as required, and the certificate
    must chain to a CA of ``tls_context`` (a verifying one) and name ``host`` (the MX name,
    also sent as SNI; RFC 8461 4.2, Postfix "verify"). ``auth`` (username, password): AUTH after
    TLS, or in clear only to a loopback address. Raises ConnectError for every failure (connect
    refused/timeout, 4xx/5xx greeting (a 5xx made transient, see _greeting_refused), 421, EHLO
    refused, TLS, AUTH); the caller tries the next address. ``ConnectError.tls_failed`` marks a
    failed opportunistic handshake.
    """
    loop = asyncio.get_running_loop()
    session = ClientSession(helo_name, use_pipelining=use_pipelining, use_chunking=use_chunking)
    conn = SmtpConnection(session, timeouts, host, ip)
    local = (source_address, 0) if source_address else None
    try:
        await asyncio.wait_for(
            loop.create_connection(lambda: conn, ip, port, local_addr=local), timeouts.connect
        )
    except TimeoutError:
        conn.abort()
        raise ConnectError(
            reply(451, "4.4.1", f"Connect to {host}[{ip}]:{port} timed out")
        ) from None
    except OSError as e:
        text = e.strerror or str(e)
        raise ConnectError(reply(451, "4.4.1", f"Connect to {host}[{ip}]:{port}: {text}")) from None
    try:
        ev = await conn.next_event()
        if isinstance(ev, Ready) and tls != "none" and ev.capabilities.starttls:
            session.starttls()
            conn._flush()
            conn._arm()
            ev = await conn.next_event()
            if isinstance(ev, StartTLS):
                ctx = tls_context or shared_client_context(False)
                sni = host if host and not is_ip(host) else None
                if tls == "verify" and (sni is None or not ctx.check_hostname):
                    conn.abort()  # no name to check: never a certificate we cannot verify
                    raise ConnectError(reply(451, "4.7.5", f"{TLS_FAILED}: no host name"))
                await conn.start_tls(ctx, sni)
                ev = await conn.next_event()
            elif isinstance(ev, Failed) and tls == "opportunistic" and ev.reply.code != 421:
                # a refused STARTTLS (454): retry this host in clear, as Postfix does
                conn.abort()
                raise ConnectError(ev.reply, tls_failed=True)
        if isinstance(ev, Failed):
            if ev.phase is Phase.GREETING:
                raise ConnectError(_greeting_refused(host, ip, ev.reply))
            raise ConnectError(ev.reply)
        if not isinstance(ev, Ready):
            raise ConnectError(reply(451, "4.4.2", f"Unexpected session event {ev!r}"))
        if tls in ("required", "verify") and not conn.tls:
            raise ConnectError(TLS_NOT_OFFERED)
        if auth is not None and ev.capabilities.auth:
            if not conn.tls and not is_loopback(ip):
                raise ConnectError(AUTH_NOT_SECURE)
            await conn.authenticate(*auth)
    except ConnectError as e:
        if e.tls_failed and tls in ("required", "verify"):
            e.tls_failed = False
        conn.close(quit=True)
        raise
    except BaseException:
        conn.abort()
        raise
    return conn


def _greeting_refused(host: str, ip: str, r: Reply) -> Reply:
    """A 5xx greeting (RFC 5321 3.1 "554") as a transient failure: such refusals are mostly
    temporary (a block list, a busy server), so the next MX is tried and, when none is left,
    the mail is deferred, not bounced (Postfix smtp_skip_5xx_greeting = yes, its default).
    The server's own code stays in the text. A mail loop (X.4.6, our own name in the greeting)
    stays permanent."""
    if not r.is_permanent() or r.enhanced == "5.4.6":
        return r
    enhanced = "4" + r.enhanced[1:] if r.enhanced else "4.0.0"  # RFC 3463 2: class 4 = transient
    first, *rest = r.lines or ("",)
    code = f"{r.code} {r.enhanced}" if r.enhanced else str(r.code)
    return reply(
        r.code - 100, enhanced, f"{host}[{ip}] refused to talk to me: {code} {first}", *rest
    )
