"""The client side of SMTP as a sans-IO state machine: what the delivery half speaks.

Replies in (:meth:`ClientSession.receive`), events and command bytes out
(:meth:`ClientSession.next_event`, :meth:`ClientSession.data_to_send`). The caller owns the
socket, the timers (:attr:`ClientSession.phase` says which RFC 5321 4.5.3.2 timeout applies)
and the decisions (start TLS? which message next?); this module owns the order of commands
and the meaning of replies.

One connection: greeting -> EHLO (HELO if EHLO is refused) -> optional STARTTLS and EHLO
again -> transactions, each MAIL/RCPT.../DATA pipelined when the server offers PIPELINING
(RFC 2920), or MAIL/RCPT.../BDAT LAST in a single write when it also offers CHUNKING
(RFC 3030) -> RSET between transactions when needed -> QUIT.

Chained transactions: once a transaction's content has gone out after DATA, the next one may
be sent before the final reply (:attr:`ClientSession.can_chain`), so its MAIL/RCPT.../DATA
travel in the same write as the previous content's final "." (RFC 2920 3.1: the content may
start a group; its example pipelines QUIT after the "."). The end of data ends the server's
transaction whatever it answers, so no RSET is needed between the two. Results still come
one per transaction, in order.
"""

from __future__ import annotations

import base64
import enum

import msgspec

from .errors import ParseError
from .parse import ReplyReader
from .replies import Capabilities, Reply, parse_ehlo, reply


class Phase(enum.Enum):
    """What the session waits for; names the timeout to use (RFC 5321 4.5.3.2)."""

    GREETING = "greeting"  # 4.5.3.2.1: 5 minutes
    EHLO = "ehlo"
    STARTTLS = "starttls"
    AUTH = "auth"  # RFC 4954: a SASL exchange (PLAIN or LOGIN) in progress
    IDLE = "idle"  # ready for a transaction: nothing expected from the server
    MAIL = "mail"  # 4.5.3.2.2: 5 minutes
    RCPT = "rcpt"  # 4.5.3.2.3: 5 minutes
    DATA = "data"  # 4.5.3.2.4: 2 minutes (the 354)
    DATA_DONE = "data_done"  # 4.5.3.2.6: 10 minutes (after the final ".")
    RSET = "rset"
    QUIT = "quit"
    CLOSED = "closed"


class Message(msgspec.Struct, gc=False):
    """One transaction to send. ``data`` is wire form (CRLF, dot-stuffed), without the final
    ".\\r\\n" (the spool's form); ``rcpt_params`` are per recipient (e.g. "NOTIFY=FAILURE")."""

    sender: str
    recipients: list[str]
    data: bytes
    body: str | None = None  # "8BITMIME" when the content is 8-bit (RFC 6152)
    smtputf8: bool = False  # the envelope or headers need SMTPUTF8 (RFC 6531)
    ret: str | None = None
    envid: str | None = None
    rcpt_params: list[str] | None = None


class Ready(msgspec.Struct, gc=False):
    """The connection can carry a transaction. ``capabilities`` from the last EHLO."""

    capabilities: Capabilities
    tls: bool


class StartTLS(msgspec.Struct, gc=False):
    """The server said 220 to STARTTLS: wrap the transport, then call tls_started()."""


class Authenticated(msgspec.Struct, gc=False):
    """The server said 235 to AUTH (RFC 4954 6): transactions may start."""


class TransactionResult(msgspec.Struct, gc=False):
    """Per-recipient outcome of one transaction (same order as Message.recipients)."""

    mail: Reply
    rcpts: list[Reply]  # the RCPT reply, or the final DATA reply for accepted recipients
    data: Reply | None  # the final reply after the content (None if content was not sent)


class Failed(msgspec.Struct, gc=False):
    """The connection is unusable: a greeting/EHLO/STARTTLS failure, 421, or a malformed
    reply. ``reply`` says why; close and (for delivery) try the next MX host."""

    reply: Reply
    phase: Phase


class Closed(msgspec.Struct, gc=False):
    """QUIT was answered (or the caller gave up): close the transport."""


ClientEvent = Ready | StartTLS | Authenticated | TransactionResult | Failed | Closed

# Replies the session makes up when it does not send (so callers see one kind of outcome).
NEED_SMTPUTF8 = reply(553, "5.6.7", "Message needs SMTPUTF8 but the server does not offer it")
TOO_BIG_FOR_SERVER = reply(552, "5.3.4", "Message size exceeds the server's fixed limit")
NO_RESPONSE = reply(451, "4.4.2", "Connection lost")

# A 552 to RCPT with one of these enhanced codes is taken as 452 4.5.3. RFC 5321 4.5.3.1.10:
# RFC 821 gave 552 for "too many recipients"; "clients SHOULD treat a 552 code in this case as a
# temporary ... failure", so the rest go in a later transaction. Only "in this case": a 552 whose
# enhanced code says something else (5.2.2 mailbox full, 5.3.4 too big) keeps its meaning; that
# is why Postfix leaves the rewrite disabled (smtp_proto.c, "#ifdef notdef").
_TOO_MANY_RECIPIENTS = (None, "5.5.3", "5.0.0")


def _path(address: str) -> bytes:
    return b"<" + address.encode("utf-8") + b">"


class ClientSession:
    """One SMTP client conversation over one connection."""

    def __init__(
        self,
        helo_name: str,
        *,
        use_pipelining: bool = True,
        use_chunking: bool = True,
        max_reply_line: int = 2048,
        max_reply_lines: int = 128,
    ) -> None:
        self.helo_name = helo_name
        self.use_pipelining = use_pipelining
        self.use_chunking = use_chunking
        self.phase = Phase.GREETING
        self.capabilities = Capabilities(esmtp=False, keywords={})
        self.tls = False
        self.greeting: Reply | None = None
        self._closed_by: Reply | None = None  # why the session failed, once it has
        self._reader = ReplyReader(max_reply_line, max_reply_lines)
        self._out: list[bytes] = []
        self._events: list[ClientEvent] = []
        self._esmtp = True  # EHLO first; HELO only if EHLO is refused
        # the transaction in flight
        self._msg: Message | None = None
        self._expect: list[str] = []  # what each outstanding reply answers: "mail", "rcpt", ...
        self._mail_reply: Reply | None = None
        self._rcpt_replies: list[Reply] = []
        self._accepted = 0
        self._dirty = False  # a transaction failed midway: RSET before the next one
        self._chained: list[Message] = []  # sent after the one in flight, not yet its turn
        self._auth_steps: list[bytes] = []  # AUTH LOGIN lines still to send on 334

    # ------------------------------------------------------------------ I/O side

    def receive(self, data: bytes) -> None:
        self._reader.feed(data)
        while self.phase is not Phase.CLOSED:
            try:
                r = self._reader.next_reply()
            except ParseError as e:
                self._fail(reply(e.code, e.enhanced, e.text))
                return
            if r is None:
                return
            self._on_reply(r)

    def connection_lost(self) -> None:
        """The transport closed under us: whatever was in flight failed transiently."""
        if self.phase in (Phase.QUIT, Phase.CLOSED):
            self.phase = Phase.CLOSED
            return
        self._fail(NO_RESPONSE)

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    def next_event(self) -> ClientEvent | None:
        return self._events.pop(0) if self._events else None

    @property
    def has_event(self) -> bool:
        """An event waits for next_event() (the I/O side need not wake its reader otherwise)."""
        return bool(self._events)

    # ------------------------------------------------------------------ caller's moves

    def starttls(self) -> None:
        """Ask for TLS (only in Phase.IDLE, when capabilities.starttls)."""
        if not self._may(Phase.IDLE):
            return
        self.phase = Phase.STARTTLS
        self._out.append(b"STARTTLS\r\n")

    def tls_started(self) -> None:
        """The transport now speaks TLS: EHLO again (RFC 3207 4.2)."""
        if self.phase is Phase.CLOSED:
            return
        self.tls = True
        self.capabilities = Capabilities(esmtp=False, keywords={})
        self._send_ehlo()

    def authenticate(self, username: str, password: str) -> None:
        """AUTH (Phase.IDLE only): PLAIN with an initial response when offered (or when
        LOGIN is not), else LOGIN (RFC 4954, RFC 4616). Authenticated or Failed follows."""
        if not self._may(Phase.IDLE):
            return
        b64 = base64.b64encode
        if "PLAIN" in self.capabilities.auth or "LOGIN" not in self.capabilities.auth:
            token = b64(b"\0" + username.encode() + b"\0" + password.encode())
            self._out.append(b"AUTH PLAIN " + token + b"\r\n")
            self._auth_steps = []
        else:
            self._out.append(b"AUTH LOGIN\r\n")
            self._auth_steps = [b64(username.encode()) + b"\r\n", b64(password.encode()) + b"\r\n"]
        self.phase = Phase.AUTH

    def refusal(self, msg: Message) -> Reply | None:
        """Why ``msg`` cannot go over this connection at all (SMTPUTF8 or SIZE), or None."""
        caps = self.capabilities
        if msg.smtputf8 and not caps.smtputf8:
            return NEED_SMTPUTF8
        if caps.size and len(msg.data) > caps.size:
            return TOO_BIG_FOR_SERVER
        return None

    @property
    def pipelining(self) -> bool:
        """Commands are pipelined: the server offers PIPELINING and the caller allows it."""
        return self.use_pipelining and self.capabilities.pipelining

    @property
    def can_chain(self) -> bool:
        """True when :meth:`send` may start the next transaction before this one's final
        reply: the server offers PIPELINING and the content after DATA has been sent (never
        after BDAT: a failed chunk does not end the server's transaction, RFC 3030 2)."""
        return (
            self._msg is not None
            and self.phase is Phase.DATA_DONE
            and bool(self._expect)
            and self._expect[-1] == "done"
            and self.pipelining
        )

    def send(self, msg: Message) -> None:
        """Start a transaction (Phase.IDLE, or chained when :attr:`can_chain`). Its outcome
        arrives as TransactionResult, after those of the transactions sent before it."""
        if self.phase is Phase.CLOSED:
            # the server closed behind the reply that made us ready (e.g. "250 ..." then
            # "421 ..." in one packet): the message gets the reason, nothing is sent
            r = self._closed_by or NO_RESPONSE
            self._events.append(TransactionResult(r, [r] * len(msg.recipients), None))
            return
        if self.phase is not Phase.IDLE:
            if not self.can_chain:
                raise RuntimeError(f"not allowed in phase {self.phase.value}")
            if self.refusal(msg) is not None:
                raise RuntimeError("a refused message cannot be chained")
            self._chained.append(msg)
            self._send_transaction(msg)
            return
        refused = self.refusal(msg)
        if refused is not None:
            self._events.append(TransactionResult(refused, [refused] * len(msg.recipients), None))
            return
        self._start(msg)
        if self._dirty:
            self._out.append(b"RSET\r\n")
            self._expect.append("rset")
            self._dirty = False
        self._send_transaction(msg)

    def _start(self, msg: Message) -> None:
        """Make ``msg`` the transaction the next replies answer."""
        self._msg = msg
        self._mail_reply = None
        self._rcpt_replies = []
        self._accepted = 0
        self.phase = Phase.MAIL

    def _send_transaction(self, msg: Message) -> None:
        self._out.append(self._mail_command(msg))
        self._expect.append("mail")
        if self.pipelining:
            self._send_rcpts_and_content(msg)

    def quit(self) -> None:
        """Say goodbye; Closed follows the 221 (or the caller may just close)."""
        if self.phase is Phase.CLOSED:
            return
        self._out.append(b"QUIT\r\n")
        self.phase = Phase.QUIT

    # ------------------------------------------------------------------ internals

    def _may(self, phase: Phase) -> bool:
        """True in ``phase``. False once closed: the server may close right behind the reply
        the caller is acting on, and the Failed event already queued tells it why. A call in
        any other phase is a bug in the caller."""
        if self.phase is phase:
            return True
        if self.phase is Phase.CLOSED:
            return False
        raise RuntimeError(f"not allowed in phase {self.phase.value}")

    def _fail(self, r: Reply) -> None:
        phase = self.phase
        self.phase = Phase.CLOSED
        self._closed_by = r
        if self._msg is not None:
            # the transaction in flight gets the failure for every recipient not yet final
            msg = self._msg
            self._msg = None
            mail = self._mail_reply
            if mail is not None and not mail.is_positive():
                # MAIL was refused: that refusal is the answer for every recipient, as in
                # _finish. The RCPT replies behind it (e.g. "503 5.5.1 need MAIL") only echo it.
                rcpts = [mail] * len(msg.recipients)
            else:
                rcpts = self._rcpt_replies + [r] * (len(msg.recipients) - len(self._rcpt_replies))
                rcpts = [x if not x.is_positive() else r for x in rcpts]
            self._events.append(TransactionResult(self._mail_reply or r, rcpts, None))
        for m in self._chained:
            # never answered: NO_RESPONSE tells the caller it may try it over another connection
            self._events.append(
                TransactionResult(NO_RESPONSE, [NO_RESPONSE] * len(m.recipients), None)
            )
        self._chained.clear()
        self._events.append(Failed(r, phase))

    def _send_ehlo(self) -> None:
        verb = b"EHLO " if self._esmtp else b"HELO "
        self._out.append(
            verb
            + self.helo_name.encode("idna" if not self.helo_name.isascii() else "ascii")
            + b"\r\n"
        )
        self.phase = Phase.EHLO

    def _mail_command(self, msg: Message) -> bytes:
        caps = self.capabilities
        parts = [b"MAIL FROM:", _path(msg.sender)]
        if caps.size is not None:
            parts.append(b" SIZE=%d" % len(msg.data))
        if msg.body and caps.eightbitmime:
            parts.append(b" BODY=" + msg.body.encode())
        if msg.smtputf8:
            parts.append(b" SMTPUTF8")
        if caps.dsn:
            if msg.ret:
                parts.append(b" RET=" + msg.ret.encode())
            if msg.envid:
                parts.append(b" ENVID=" + msg.envid.encode())
        parts.append(b"\r\n")
        return b"".join(parts)

    def _rcpt_command(self, msg: Message, i: int) -> bytes:
        cmd = b"RCPT TO:" + _path(msg.recipients[i])
        if msg.rcpt_params and self.capabilities.dsn and msg.rcpt_params[i]:
            cmd += b" " + msg.rcpt_params[i].encode()
        return cmd + b"\r\n"

    def _chunking(self) -> bool:
        return self.use_chunking and self.capabilities.chunking

    def _send_rcpts_and_content(self, msg: Message) -> None:
        """With PIPELINING: every RCPT and the DATA (or BDAT with the content) in one go."""
        for i in range(len(msg.recipients)):
            self._out.append(self._rcpt_command(msg, i))
            self._expect.append("rcpt")
        self._send_content_command(msg)

    def _send_content_command(self, msg: Message) -> None:
        if self._chunking():
            # BDAT carries the content as is: undo the dot-stuffing of the wire form.
            content = _unstuff(msg.data)
            self._out.append(b"BDAT %d LAST\r\n" % len(content))
            self._out.append(content)
            self._expect.append("bdat")
        else:
            self._out.append(b"DATA\r\n")
            self._expect.append("data")

    def _is_myself(self, r: Reply) -> bool:
        """The greeting or EHLO reply starts with the name this client says in EHLO: the
        connection went back to this MTA (an MX or route that points at us). Postfix: "mail
        for ... loops back to myself"."""
        mine = self.helo_name.rstrip(".").lower()
        if "." not in mine or mine.startswith("localhost."):
            return False  # "localhost" and bare names are not unique: many test servers use them
        first = r.lines[0] if r.lines else ""
        name = first.split(None, 1)[0] if first.strip() else ""
        return name.rstrip(".").lower() == mine

    def _loop_reply(self, r: Reply) -> Reply:
        # RFC 3463 X.4.6 routing loop detected; permanent, as in Postfix
        name = r.lines[0].split(None, 1)[0]
        return reply(550, "5.4.6", f"Mail loops back to myself: the server greets as {name}")

    def _on_reply(self, r: Reply) -> None:
        phase = self.phase
        if r.code == 421 and phase not in (Phase.QUIT,):
            self._fail(r)  # RFC 5321 3.8: the server is closing
            return
        if phase is Phase.GREETING:
            self.greeting = r
            if r.code != 220:
                self._fail(r)
            elif self._is_myself(r):
                self._fail(self._loop_reply(r))
            else:
                self._send_ehlo()
        elif phase is Phase.EHLO:
            if r.code == 250 and self._is_myself(r):
                self._fail(self._loop_reply(r))
            elif r.code == 250:
                self.capabilities = (
                    parse_ehlo(r) if self._esmtp else Capabilities(esmtp=False, keywords={})
                )
                self.phase = Phase.IDLE
                self._events.append(Ready(self.capabilities, self.tls))
            elif self._esmtp and r.code in (500, 501, 502, 504, 550):
                self._esmtp = False  # an old server: fall back to HELO (RFC 5321 3.2)
                self._send_ehlo()
            else:
                self._fail(r)
        elif phase is Phase.STARTTLS:
            if r.code == 220:
                self._events.append(StartTLS())
            else:
                self._fail(r)
        elif phase is Phase.AUTH:
            if r.code == 334 and self._auth_steps:
                self._out.append(self._auth_steps.pop(0))
            elif r.code == 235:
                self._auth_steps = []
                self.phase = Phase.IDLE
                self._events.append(Authenticated())
            else:
                self._auth_steps = []
                self._fail(r)
        elif phase is Phase.QUIT:
            self.phase = Phase.CLOSED
            self._events.append(Closed())
        elif phase is Phase.IDLE:
            self._fail(reply(451, "4.5.0", f"Unexpected reply: {r}"))
        else:
            self._transaction_reply(r)

    def _transaction_reply(self, r: Reply) -> None:
        if not self._expect:
            self._fail(reply(451, "4.5.0", f"Unexpected reply: {r}"))
            return
        what = self._expect.pop(0)
        msg = self._msg
        assert msg is not None
        pipelined = self.pipelining
        if what == "rset":
            return
        if what == "mail":
            self._mail_reply = r
            if not r.is_positive():
                self._dirty = True
                if not pipelined:
                    self._finish(None)
                return
            if not pipelined:
                self.phase = Phase.RCPT
                self._out.append(self._rcpt_command(msg, 0))
                self._expect.append("rcpt")
            else:
                self.phase = Phase.RCPT
            return
        if what == "rcpt":
            if r.code == 552 and r.enhanced in _TOO_MANY_RECIPIENTS:
                r = reply(452, "4.5.3", *r.lines)  # the server's text stays
            self._rcpt_replies.append(r)
            if r.is_positive():
                self._accepted += 1
            if not pipelined:
                n = len(self._rcpt_replies)
                if n < len(msg.recipients):
                    self._out.append(self._rcpt_command(msg, n))
                    self._expect.append("rcpt")
                elif self._accepted:
                    self._send_content_command(msg)
                    self.phase = Phase.DATA if not self._chunking() else Phase.DATA_DONE
                else:
                    self._dirty = True
                    self._finish(None)
            elif len(self._rcpt_replies) == len(msg.recipients):
                self.phase = Phase.DATA_DONE if self._chunking() else Phase.DATA
            return
        if what == "data":
            ok = self._mail_reply is not None and self._mail_reply.is_positive() and self._accepted
            if r.code == 354:
                if ok:
                    self._out.append(msg.data)
                    self._out.append(b".\r\n")
                    self._expect.append("done")
                else:
                    # RFC 2920 3.1: no valid recipients yet 354; end the (empty) content
                    self._out.append(b".\r\n")
                    self._expect.append("discard")
                self.phase = Phase.DATA_DONE
                return
            if r.is_positive():
                # RFC 5321 4.3.2: DATA goes on only after 354 ("I", then "S" after the content);
                # a 2xx or another 3xx here accepted nothing, and what the server's next reply
                # would answer is unknown: give up on this connection, transiently. (A 1yz never
                # gets here: the reply reader refuses it, RFC 5321 4.2.)
                self._fail(_unexpected("DATA", r))
                return
            self._dirty = True
            self._finish(r if ok else None)
            return
        if what == "discard":
            self._dirty = True
            self._finish(None)
            return
        # "done" (after the final dot) or "bdat"
        if 300 <= r.code < 400:
            # RFC 5321 4.2.1: only 2yz completes the transaction; a 3yz to the end of the
            # content (or to BDAT LAST, RFC 3030 2) accepted nothing, and leaves the reply
            # sequence unknown: give up on this connection, transiently.
            self._fail(_unexpected("the end of data" if what == "done" else "BDAT", r))
            return
        ok = self._mail_reply is not None and self._mail_reply.is_positive() and self._accepted
        if not r.is_positive() and not self._chained:
            self._dirty = True  # (a chained MAIL already went out: the "." ended it anyway)
        self._finish(r if ok else None)

    def _finish(self, data_reply: Reply | None) -> None:
        msg = self._msg
        assert msg is not None and self._mail_reply is not None
        mail = self._mail_reply
        if not mail.is_positive():
            rcpts = [mail] * len(msg.recipients)
        else:
            rcpts = list(self._rcpt_replies)
            rcpts += [reply(451, "4.5.0", "No reply")] * (len(msg.recipients) - len(rcpts))
            if data_reply is not None:
                rcpts = [data_reply if x.is_positive() else x for x in rcpts]
            else:
                rcpts = [
                    reply(451, "4.5.0", "Content not sent") if x.is_positive() else x for x in rcpts
                ]
        self._events.append(TransactionResult(mail, rcpts, data_reply))
        if self._chained:
            self._start(self._chained.pop(0))  # its replies come next
        else:
            self._msg = None
            self.phase = Phase.IDLE


def _unexpected(what: str, r: Reply) -> Reply:
    """Why a session gave up on a reply that makes no sense where it came (RFC 3463 4.5.0)."""
    return reply(451, "4.5.0", f"Unexpected reply to {what}: {r}")


def _unstuff(wire: bytes) -> bytes:
    """Wire form -> content for BDAT (RFC 3030 has no dot-stuffing)."""
    if wire.startswith(b".."):
        wire = wire[1:]
    return wire.replace(b"\r\n..", b"\r\n.")
