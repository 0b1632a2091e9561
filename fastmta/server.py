"""The SMTP listener: an asyncio.Protocol adapter around the sans-IO server session, plus
the policy the session asks about (relay rules, local users, AUTH credentials, limits).

The adapter moves bytes and answers events; the protocol lives in
fastmta/protocol/server.py. A message is answered 250 only after the spool has made it
durable (Spool.store returns after the group commit's fdatasync).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable

from . import auth, headers
from .aliases import AliasError, Aliases
from .anvil import ConnectionCounts, WorkerCounts
from .config import Config, Listener
from .dkim import Signers
from .log import DeliveryLog, ReceptionRecord
from .policy import RelayPolicy
from .protocol import replies as R
from .protocol import server as S
from .protocol.errors import domain_of
from .protocol.replies import Reply, reply
from .spool import Spool, SpoolError
from .spool.records import Envelope, Recipient, StoredMessage, new_queue_id

log = logging.getLogger("fastmta.smtpd")

SPOOL_FAILED = reply(452, "4.3.1", "Insufficient system storage")  # RFC 3463 4.3.1
TOO_MANY_CONNECTIONS = reply(421, "4.7.0", "Too many connections, try again later")
TOO_MANY_FROM_YOU = reply(421, "4.7.0", "Too many connections from your address")
AUTH_FAILED = reply(535, "5.7.8", "Authentication credentials invalid")  # RFC 4954 6
AUTH_TOO_MANY = reply(421, "4.7.0", "Too many failed authentication attempts")
# RFC 5321 6.3 (loop detection by counting Received: fields); RFC 3463 X.4.6 routing loop
TOO_MANY_HOPS = "Too many hops ({} Received: header fields): a mail loop?"
DKIM_FAILED = reply(451, "4.3.0", "Message could not be signed, try again later")


class Listening:
    """What the connections of one listener share in one worker process: the session
    configuration, the policy, the spool, and the connection counts behind the limits (shared
    with the other workers: fastmta/anvil.py)."""

    def __init__(
        self,
        config: Config,
        listener: Listener,
        spool: Spool,
        *,
        submit: Callable[[StoredMessage], None],
        users: auth.Users | None = None,
        local_check: Callable[[str], tuple[int, str, str] | None] | None = None,
        ssl_context: ssl.SSLContext | None = None,
        counts: WorkerCounts | None = None,
        dkim: Signers | None = None,
        delivery_log: DeliveryLog | None = None,
    ) -> None:
        self.config = config
        self.listener = listener
        self.spool = spool
        self.submit = submit
        self.users = users
        self.local_check = local_check
        self.ssl_context = ssl_context
        lim = config.limits
        tls_mode = listener.tls
        self.session_config = S.SessionConfig(
            hostname=config.server.hostname,
            max_message_size=lim.max_message_size,
            max_recipients=lim.max_recipients,
            max_line_length=lim.max_line_length,
            max_command_line=lim.max_command_line,
            max_auth_line=lim.max_auth_line,
            max_errors=lim.max_errors,
            bare_newline=listener.bare_newline,
            tls_available=tls_mode == "starttls" and ssl_context is not None,
            tls_active=tls_mode == "implicit",
            auth_mechanisms=auth.MECHANISMS if users is not None else (),
            auth=listener.auth if users is not None else "never",
            auth_required=listener.role == "submission",
            soft_bounce=config.server.soft_bounce,
        )
        pol = config.policy
        self.policy = RelayPolicy(
            pol.mynetworks, pol.local_domains, pol.relay_domains, pol.relay_recipients
        )
        # RCPT TO:<postmaster> (RFC 5321 4.5.1) is stored as postmaster@ the first local domain,
        # else @ the hostname (Postfix appends $myorigin): delivered like any other address
        exact = [d.rstrip(".") for d in config.policy.local_domains if not d.startswith(".")]
        self.postmaster_domain = exact[0] if exact else config.server.hostname
        self.aliases = Aliases.from_config(config)  # recipients rewritten before queueing
        self.connections: set[SmtpConnection] = set()  # this worker's, for drain()
        self.counts = counts if counts is not None else ConnectionCounts(1).worker(0)
        self.accepting = True
        self.messages = 0  # accepted, for logs and tests
        self.dkim = dkim if dkim else None  # signs what trusted clients send (fastmta/dkim.py)
        self.delivery_log = delivery_log  # one "received" line per message taken in

    def __call__(self) -> SmtpConnection:
        return SmtpConnection(self)

    async def drain(self, timeout: float) -> None:
        """Stop: idle sessions get 421 now; sessions inside a transaction may finish it
        (bounded by ``timeout``), then get 421."""
        self.accepting = False
        for conn in list(self.connections):
            conn.drain()
        deadline = time.monotonic() + timeout
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.abort()


class SmtpConnection(asyncio.Protocol):
    """One client connection. ``data_received`` feeds the session and answers its events."""

    def __init__(self, ctx: Listening) -> None:
        self.ctx = ctx
        self.session = S.ServerSession(ctx.session_config)
        self.transport: asyncio.Transport | None = None
        self.peer_ip = "?"
        self.busy = False  # an event is being answered asynchronously (spool, AUTH)
        self.draining = False
        self.auth_failures = 0
        self._sasl: auth.Sasl | None = None
        self._last = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._counted = False
        self._paused = False  # reading paused while busy or while writing is paused
        self._write_paused = False  # the transport's write buffer is over its high-water mark
        self._eof = False  # the client half-closed: answer what it sent, then close
        self._deadline: float | None = None  # end of the time allowed for the message content
        self._timer_at = 0.0  # when the armed timer fires (monotonic)
        self._storing = ""  # queue id of the message being stored

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._loop = asyncio.get_running_loop()
        peer = transport.get_extra_info("peername")
        self.peer_ip = peer[0] if peer else "?"
        if self.peer_ip.startswith("::ffff:"):
            self.peer_ip = self.peer_ip[7:]
        ctx = self.ctx
        lim = ctx.config.limits
        if not ctx.accepting:
            self._refuse(R.SHUTTING_DOWN)
            return
        counts = ctx.counts
        if counts.total() >= lim.max_connections:
            self._refuse(TOO_MANY_CONNECTIONS)
            return
        if counts.of(self.peer_ip) >= lim.max_connections_per_ip:
            self._refuse(TOO_MANY_FROM_YOU)
            return
        ctx.connections.add(self)
        counts.opened(self.peer_ip)
        self._counted = True
        self._last = self._now()
        pause = lim.greet_pause
        if pause > 0:
            self._loop.call_later(pause, self._greet)
        else:
            self._greet()
        self._arm_timer()

    def _greet(self) -> None:
        if self.transport is not None and not self.session.closed:
            self.session.greet()
            self._flush()

    def data_received(self, data: bytes) -> None:
        self._last = self._now()
        self.session.receive(data)
        if self.busy or self._write_paused:
            # The client sent more while its message is being stored (a pipelined QUIT, or
            # abuse), or while it does not read our replies: keep it in the session, read no
            # more until the answer is out. Pausing only now, not at every store, saves two
            # epoll changes per message.
            self._pause()
            self._watch_content()
            return
        self._process()

    def eof_received(self) -> bool | None:
        """The client shut down its sending side (it may still read, e.g. after a pipelined
        "... . QUIT"): answer everything it sent, the stored message included, then close
        (_process). Closing at once would lose the 250 of a stored message: the client would
        send it again. TLS cannot half-close (asyncio and uvloop close it anyway)."""
        self._eof = True
        if self.session.tls:
            return False
        self._process()
        return True

    def pause_writing(self) -> None:
        """The write buffer is over its high-water mark: the client does not read our replies.
        Read and answer nothing more until it does, so the buffer stays bounded (a pipelined
        stream of NOOPs must not grow it without limit)."""
        self._write_paused = True
        self._pause()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._carry_on()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._counted:
            self._counted = False
            ctx = self.ctx
            ctx.connections.discard(self)
            ctx.counts.closed(self.peer_ip)
        # A message being stored when the client vanished stays stored (the spool finishes
        # the write); only the reply is lost and the client retries: at-least-once.
        self.transport = None

    # ------------------------------------------------------------------ events

    def _process(self) -> None:
        """Answer events until the session needs more input or an async answer."""
        s = self.session
        while not self.busy and not self._write_paused and self.transport is not None:
            ev = s.next_event()
            if ev is None:
                break
            if isinstance(ev, S.RcptEvent):
                self._on_rcpt(ev)
            elif isinstance(ev, S.MailEvent):
                s.accept()
            elif isinstance(ev, S.MessageEvent):
                self._store(ev)
            elif isinstance(ev, S.StartTLSEvent):
                self._start(self._starttls())
            elif isinstance(ev, S.AuthEvent):
                self._users_current()
                self._sasl = auth.start(ev.mechanism, ev.initial, self.ctx.users)
                self._on_sasl(self._sasl.initial)
            elif isinstance(ev, S.AuthResponseEvent):
                assert self._sasl is not None
                self._on_sasl(self._sasl.step(ev.line))
            elif isinstance(ev, S.CloseEvent):
                self._flush()
                self._close()
                return
        self._flush()
        self._watch_content()
        if self.draining and not self.busy and s.state in (S.State.READY, S.State.CONNECTED):
            s.shutdown()
            self._flush()
            self._close()
        elif self._eof and not self.busy and not self._write_paused:
            # all the half-closed client sent is answered (an unfinished command or message
            # is dropped); transport.close() sends the replies still buffered first
            self._close()

    def _users_current(self) -> None:
        """The users file as it is now: `fastmta passwd` takes effect at the next AUTH, no
        reload needed (Postfix's daemons likewise restart when a table they use changes). A
        stat per AUTH; a file made unreadable or malformed keeps the table loaded before."""
        users = self.ctx.users
        if users is None:
            return
        try:
            if users.reload_if_changed():
                log.info("users file %s reloaded (%d users)", users.path, len(users))
        except (OSError, auth.UsersFileError) as e:
            log.error("users file not reloaded, the previous one stays in use: %s", e)

    def _on_rcpt(self, ev: S.RcptEvent) -> None:
        ctx = self.ctx
        address = ev.rcpt.address
        domain = domain_of(address)
        denied = ctx.policy.rcpt_allowed(self.peer_ip, self.session.user is not None, domain)
        if denied is not None:
            self.session.reject(reply(*denied))
            return
        if ctx.aliases:
            try:
                aliased = ctx.aliases.expand(address) != [address]
            except AliasError as e:
                log.error("RCPT <%s>: %s", address, e)
                self.session.reject(reply(*e.reply))
                return
            if aliased:
                self.session.accept()  # an alias need not be a mailbox itself
                return
        unknown = ctx.policy.relay_recipient_check(address, domain)
        if unknown is not None:
            self.session.reject(reply(*unknown))
            return
        if ctx.local_check is not None and domain and ctx.policy.is_local(domain):
            unknown = ctx.local_check(address)
            if unknown is not None:
                self.session.reject(reply(*unknown))
                return
        self.session.accept()

    def _on_sasl(self, result: auth.SaslResult) -> None:
        if isinstance(result, auth.SaslChallenge):
            self.session.challenge(result.data)
        elif isinstance(result, auth.SaslError):
            self.session.reject(reply(result.code, result.enhanced, result.text))
        elif isinstance(result, auth.SaslVerified):
            self._start(self._auth_outcome(result.username, result.ok, result.reason))
        else:
            self._start(self._verify(result))

    def _start(self, coro) -> None:
        """Answer the current event asynchronously; input waits (bounded buffers)."""
        self.busy = True
        self._pause()
        self._task = self._loop.create_task(coro)
        self._task.add_done_callback(self._resume)

    def _resume(self, task: asyncio.Task[None]) -> None:
        self.busy = False
        if not task.cancelled() and task.exception() is not None:
            log.error("session task failed", exc_info=task.exception())
            self._close()
            return
        self._carry_on()

    def _carry_on(self) -> None:
        """The asynchronous answer is out, or the client reads again: read again and answer
        what waits."""
        if self.transport is None or self.busy or self._write_paused:
            return
        if self._paused:
            self._paused = False
            self.transport.resume_reading()
        self._process()

    def _pause(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def _store(self, ev: S.MessageEvent) -> None:
        """Hand the message to the spool; _stored() answers once it is durable. A future and
        a callback rather than a task: this runs once per message."""
        ctx = self.ctx
        s = self.session
        queue_id = new_queue_id()
        mail = ev.mail
        head = headers.header_block_end(ev.chunks)[0]
        hops = headers.hop_count(head)
        if hops > ctx.config.limits.max_hops:
            log.warning(
                "%s: refused from [%s]: %d Received: fields, over limits.max_hops (%d)",
                queue_id, self.peer_ip, hops, ctx.config.limits.max_hops,
            )  # fmt: skip
            s.reject(reply(554, "5.4.6", TOO_MANY_HOPS.format(hops)))
            return
        try:
            recipients = ctx.aliases.recipients(
                Recipient(
                    r.address if "@" in r.address else f"{r.address}@{ctx.postmaster_domain}",
                    notify=r.notify,
                    orcpt=r.orcpt,
                )
                for r in ev.rcpts
            )
        except AliasError as e:  # (RCPT checked each address; a bare postmaster is qualified here)
            log.error("%s: %s", queue_id, e)
            s.reject(reply(*e.reply))
            return
        env = Envelope(
            id=queue_id,
            sender=mail.address,
            recipients=recipients,
            arrival=time.time(),
            body=mail.body,
            # an alias may lead to a UTF-8 address (RFC 6531 3.4: then SMTPUTF8 is needed)
            smtputf8=mail.smtputf8
            or (bool(ctx.aliases) and not all(r.address.isascii() for r in recipients)),
            ret=mail.ret,
            envid=mail.envid,
            client=f"[{self.peer_ip}] {s.helo or ''}".rstrip(),
            auth=s.user,
            message_id=headers.message_id(head),
        ).share_strings()
        trace = headers.received(
            helo=s.helo,
            client_ip=self.peer_ip,
            hostname=ctx.config.server.hostname,
            protocol=headers.protocol_name(s.esmtp, s.tls, s.user is not None),
            queue_id=queue_id,
            recipient=ev.rcpts[0].address if len(ev.rcpts) == 1 else None,
        )
        parts = [trace]
        if ctx.listener.role == "submission":
            added = headers.submission_fields(head, ctx.config.server.hostname, queue_id)
            parts.append(added)
            env.message_id = env.message_id or headers.message_id(added)
        parts += ev.chunks
        if ctx.dkim is not None and ctx.policy.may_relay(self.peer_ip, s.user is not None):
            # the signer by the From: field; the message is joined only when one signs it
            signer = ctx.dkim.for_message(headers.header_block_end(parts[1:])[0])
            if signer is not None:
                message = b"".join(parts[1:])  # what the client sent (and submission added)
                # On the loop: an RSA-2048 signature is ~0.3 ms of CPU; a signing thread cost
                # more CPU in GIL hand-offs than it saved (benchmarks/RESULTS.md, notes).
                try:
                    parts = [signer.sign(message), trace, message]
                except Exception as e:  # a bug, or a key that broke: the client may retry
                    log.error("%s: DKIM signing failed, answered 451: %r", queue_id, e)
                    s.reject(DKIM_FAILED)
                    return
        try:
            fut = ctx.spool.start_store(env, parts)
        except SpoolError as e:
            self._store_failed(queue_id, e)
            return
        self.busy = True
        self._storing = queue_id
        fut.add_done_callback(self._stored)

    def _stored(self, fut: asyncio.Future[StoredMessage]) -> None:
        self.busy = False
        try:
            stored = fut.result()
        except SpoolError as e:
            self._store_failed(self._storing, e)
        except asyncio.CancelledError:  # the worker is stopping
            self._close()
            return
        except Exception as e:  # a bug: drop the session, not the worker
            log.error("%s: storing the message failed", self._storing, exc_info=e)
            self._close()
            return
        else:
            self._accepted(stored)
        # A message stored while the client vanished stays stored and is delivered; only the
        # reply is lost, and the client retries: at-least-once.
        self._carry_on()

    def _store_failed(self, queue_id: str, e: SpoolError) -> None:
        log.error("%s: spool write failed, answered 452: %s", queue_id, e)
        self.session.reject(SPOOL_FAILED)

    def _accepted(self, stored: StoredMessage) -> None:
        ctx = self.ctx
        env = stored.envelope
        queue_id = env.id
        ctx.messages += 1
        log.debug(
            "%s: from=<%s> nrcpt=%d size=%d client=%s",
            queue_id,
            env.sender,
            len(env.recipients),
            env.size,
            env.client,
        )
        self.session.accept(reply(250, "2.0.0", f"Ok: queued as {queue_id}"))
        if ctx.delivery_log is not None:
            ctx.delivery_log.write(ReceptionRecord.of(env, "smtp", tls=self.session.tls))
        ctx.submit(stored)

    async def _starttls(self) -> None:
        self._flush()  # the 220 goes out in clear first (RFC 3207 4)
        transport = self.transport
        ctx = self.ctx
        if transport is None or ctx.ssl_context is None:
            return
        loop = asyncio.get_running_loop()
        try:
            new = await asyncio.wait_for(
                loop.start_tls(transport, self, ctx.ssl_context, server_side=True),
                ctx.config.limits.command_timeout,
            )
        except (TimeoutError, OSError, ssl.SSLError, ConnectionError) as e:
            log.info("TLS handshake with [%s] failed: %s", self.peer_ip, e)
            transport.abort()
            self.transport = None
            return
        if new is None:
            self.transport = None
            return
        self.transport = new  # type: ignore[assignment]
        self.session.tls_started()

    async def _verify(self, creds: auth.SaslDone) -> None:
        users = self.ctx.users
        assert users is not None
        loop = asyncio.get_running_loop()
        ok = await loop.run_in_executor(None, users.verify, creds.username, creds.password)
        await self._auth_outcome(creds.username, ok)

    async def _auth_outcome(self, username: str, ok: bool, reason: str = "") -> None:
        """235, or a failure: counted, answered later each time, the last one with 421."""
        if ok:
            self.session.auth_success(username)
            return
        self.auth_failures += 1
        lim = self.ctx.config.limits
        why = f" ({reason})" if reason else ""
        log.warning("AUTH failed for %r from [%s]%s", username, self.peer_ip, why)
        await asyncio.sleep(auth.failure_delay(lim.auth_failure_delay, self.auth_failures))
        if self.auth_failures >= lim.max_auth_failures:
            self.session.reject(AUTH_TOO_MANY)
        else:
            self.session.reject(AUTH_FAILED)

    # ------------------------------------------------------------------ plumbing

    def _flush(self) -> None:
        out = self.session.data_to_send()
        if out and self.transport is not None:
            self.transport.write(out)
        self._last = self._now()

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _refuse(self, r: Reply) -> None:
        assert self.transport is not None
        self.transport.write(r.to_bytes())
        self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def drain(self) -> None:
        """Finish the transaction in progress, then 421 (or at once when idle)."""
        self.draining = True
        if not self.busy and self.session.state in (S.State.READY, S.State.CONNECTED):
            self.session.shutdown()
            self._flush()
            self._close()

    # time.monotonic is a vDSO call; asyncio.get_running_loop() costs a getpid(2) per call
    _now = staticmethod(time.monotonic)

    def _watch_content(self) -> None:
        """limits.data_timeout bounds the whole content of one message, from the 354 (or the
        first BDAT chunk) to its end: a client trickling a byte now and then is not idle, yet
        must not hold the session (and its buffers) for ever. Set the deadline when the content
        starts, forget it when the content is complete."""
        if self.session.receiving_content:
            if self._deadline is None and self.transport is not None:
                self._deadline = self._now() + self.ctx.config.limits.data_timeout
                if self._timer is None or self._timer_at > self._deadline:
                    if self._timer is not None:  # set for later than the deadline
                        self._timer.cancel()
                    self._arm_timer()
        else:
            self._deadline = None

    def _arm_timer(self) -> None:
        when = self._last + self.ctx.config.limits.command_timeout
        if self._deadline is not None:
            when = min(when, self._deadline)
        self._timer_at = when
        self._timer = self._loop.call_later(max(0.0, when - self._now()), self._on_timer)

    def _on_timer(self) -> None:
        """RFC 5321 4.5.3.2.7: a server waits at least 5 minutes for the next command (and
        4.5.3.2.5/6 for each piece of content); the content as a whole gets data_timeout."""
        transport = self.transport
        if transport is None:
            return
        if self.busy:
            self._arm_timer()
            return
        if transport.is_closing():
            # closed, but the client has not read our last replies in a whole timeout
            transport.abort()
            return
        now = self._now()
        if self._deadline is not None and now >= self._deadline:
            why = "data timeout"  # nothing is stored: the client retries the whole message
        elif now - self._last >= self.ctx.config.limits.command_timeout:
            why = "timeout"
        else:
            self._arm_timer()
            return
        log.info("%s from [%s] in state %s", why, self.peer_ip, self.session.state.value)
        self._deadline = None
        self.session.timeout()  # 421 4.4.2
        self._flush()
        if self._write_paused:  # the client does not read: the 421 would never leave
            transport.abort()
            return
        self._close()
        self._arm_timer()  # to abort if the client does not read the 421 either
