"""The server side of SMTP as a sans-IO state machine (RFC 5321, with PIPELINING RFC 2920,
CHUNKING RFC 3030, STARTTLS RFC 3207, AUTH RFC 4954, SMTPUTF8 RFC 6531, DSN RFC 3461).

Bytes in (:meth:`ServerSession.receive`), events and reply bytes out
(:meth:`ServerSession.next_event`, :meth:`ServerSession.data_to_send`). No sockets, no
asyncio. Decisions that are policy (may this sender send? is this recipient ours? is the
message stored?) are asked of the caller through events; the session waits, in order, until
the caller answers with :meth:`accept` or :meth:`reject`. Everything about the protocol's
state lives here; the I/O adapter only moves bytes and answers events.
"""

from __future__ import annotations

import base64
import enum
import functools

import msgspec

from . import replies as R
from .errors import MailFrom, ParseError, RcptTo
from .parse import (
    MODE_BDAT,
    MODE_WIRE,
    DataReader,
    LineReader,
    parse_command,
    parse_mail,
    parse_rcpt,
)
from .replies import Reply, reply


class State(enum.Enum):
    GREETING = "greeting"  # connected; greeting not sent yet
    CONNECTED = "connected"  # greeted; no HELO/EHLO yet
    READY = "ready"  # HELO/EHLO done, no transaction
    MAIL = "mail"  # MAIL accepted, no recipient yet
    RCPT = "rcpt"  # at least one recipient accepted
    DATA = "data"  # reading message content after 354
    BDAT = "bdat"  # reading a BDAT chunk
    AUTH = "auth"  # inside a SASL exchange
    CLOSED = "closed"


class SessionConfig(msgspec.Struct, kw_only=True):
    """What a listener lets its sessions do; every limit with its RFC."""

    hostname: str = "localhost"
    max_message_size: int = 50 << 20  # advertised with SIZE (RFC 1870)
    max_recipients: int = 1000  # >= 100 (RFC 5321 4.5.3.1.8)
    max_line_length: int = 1000  # text line incl. CRLF (RFC 5321 4.5.3.1.6)
    max_command_line: int = 512  # command line incl. CRLF (RFC 5321 4.5.3.1.4)
    max_auth_line: int = 12288  # SASL response lines (RFC 4954 4)
    # errors (bad commands, refused MAIL/RCPT) before 421 and disconnect; Postfix
    # smtpd_hard_error_limit, 20 by default
    max_errors: int = 20
    bare_newline: str = "reject"  # "reject" | "normalize" (Postfix smtpd_forbid_bare_newline)
    forbid_unauth_pipelining: bool = True  # Postfix 3.9 smtpd_forbid_unauth_pipelining
    tls_available: bool = False  # offer STARTTLS (a certificate is configured)
    tls_active: bool = False  # implicit TLS (port 465 style) or after STARTTLS
    auth_mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN")
    auth: str = "tls"  # offer AUTH: "tls" (only under TLS), "always", "never"
    auth_required: bool = False  # submission: AUTH before MAIL (RFC 6409 4.3)
    chunking: bool = True  # RFC 3030
    pipelining: bool = True  # RFC 2920; False: not offered, and a client must wait per reply
    smtputf8: bool = True  # RFC 6531; False: not offered, MAIL ... SMTPUTF8 gets 555
    dsn: bool = True  # RFC 3461; False: not offered, RET/ENVID/NOTIFY/ORCPT get 555
    soft_bounce: bool = False  # every 5xx reply goes out as 4xx (Postfix soft_bounce)


# ------------------------------------------------------------------------------ events


class MailEvent(msgspec.Struct, gc=False):
    """MAIL FROM parsed and valid; answer with accept() or reject(reply)."""

    mail: MailFrom


class RcptEvent(msgspec.Struct, gc=False):
    """RCPT TO parsed and valid; answer with accept() or reject(reply)."""

    rcpt: RcptTo


class MessageEvent(msgspec.Struct):
    """A whole message arrived. ``chunks`` are wire form (CRLF, dot-stuffed, without the
    final ".\\r\\n"). Store it, then accept(reply) with "250 ... queued as ID"; or reject."""

    mail: MailFrom
    rcpts: list[RcptTo]
    chunks: list[bytes]
    size: int


class StartTLSEvent(msgspec.Struct, gc=False):
    """220 was queued: send it, start TLS on the transport, then call tls_started()."""


class AuthEvent(msgspec.Struct, gc=False):
    """AUTH <mechanism> [initial-response]. Drive the SASL exchange with challenge(),
    then auth_success(user) or reject(reply). ``initial`` is the raw base64 (``b"="`` = empty)."""

    mechanism: str
    initial: bytes | None


class AuthResponseEvent(msgspec.Struct, gc=False):
    """A client line in a SASL exchange (base64, or b"*" to cancel, RFC 4954 4)."""

    line: bytes


class CloseEvent(msgspec.Struct, gc=False):
    """Send what is pending, then close the connection."""

    reason: str


Event = (
    MailEvent
    | RcptEvent
    | MessageEvent
    | StartTLSEvent
    | AuthEvent
    | AuthResponseEvent
    | CloseEvent
)

# Verbs that say the peer is not an SMTP client at all (Postfix drops these at once).
_NON_SMTP = frozenset({"GET", "POST", "PUT", "HEAD", "CONNECT", "OPTIONS", "USER"})

_MAX_BDAT_DIGITS = 20


@functools.lru_cache(maxsize=64)
def _single_line(code: int, text: str) -> bytes:
    """A reply without an enhanced code (greeting, HELO), formatted once per listener."""
    return Reply(code, None, (text,)).to_bytes()


@functools.lru_cache(maxsize=64)
def _ehlo_reply(
    hostname: str,
    pipelining: bool,
    size: int,
    starttls: bool,
    auth: str | None,
    smtputf8: bool,
    chunking: bool,
    dsn: bool = True,
) -> bytes:
    """The EHLO reply (RFC 5321 4.1.1.1): the same few variants for every session of a
    listener (before/after TLS and AUTH), so each is formatted once."""
    lines = [hostname] + (["PIPELINING"] if pipelining else [])
    lines.append(f"SIZE {size}")
    if starttls:
        lines.append("STARTTLS")
    if auth is not None:
        lines.append("AUTH " + auth)
    lines += ["ENHANCEDSTATUSCODES", "8BITMIME"] + (["DSN"] if dsn else [])
    if smtputf8:
        lines.append("SMTPUTF8")
    if chunking:
        lines.append("CHUNKING")
    return Reply(250, None, tuple(lines)).to_bytes()


class ServerSession:
    """One SMTP server conversation. See the module docstring for the contract."""

    def __init__(self, config: SessionConfig, *, greeting: str | None = None) -> None:
        self.config = config
        self.state = State.GREETING
        self.helo: str | None = None  # the name the client gave
        self.esmtp = False
        self.tls = config.tls_active
        self.user: str | None = None  # authenticated user
        self.mail: MailFrom | None = None
        self.rcpts: list[RcptTo] = []
        self.errors = 0
        self._greeting = greeting or f"{config.hostname} ESMTP fastmta"
        self._out: list[bytes] = []
        if config.soft_bounce:
            self._send = self._send_soft  # type: ignore[method-assign]
        self._lines = LineReader(config.max_command_line, config.bare_newline == "normalize")
        self._waiting: Event | None = None  # the event whose answer we are waiting for
        self._ready: list[Event] = []  # events produced by receive() (content finished, close)
        self._data: DataReader | None = None
        self._bdat_left = 0  # octets of the current BDAT chunk still to read
        self._bdat_last = False
        self._bdat_failed: Reply | None = None  # an error already given in this BDAT transaction
        self._bdat_prev = State.READY  # the state to return to after a chunk

    # ------------------------------------------------------------------ I/O side

    def greet(self) -> None:
        """Queue the 220 greeting (RFC 5321 4.3.1). The adapter may wait before calling it
        (a greet pause) to catch clients that talk first."""
        if self.state is State.GREETING:
            self.state = State.CONNECTED
            self._out.append(_single_line(220, self._greeting))

    def receive(self, data: bytes) -> None:
        """Bytes from the client. Cheap: content goes straight into the content reader;
        commands are parsed by next_event()."""
        if self.state is State.CLOSED or not data:
            return
        if self.state is State.GREETING and self.config.forbid_unauth_pipelining:
            self._sync_error("input before greeting")
            return
        if self.state is State.DATA:
            self._feed_data(data)
        elif self.state is State.BDAT:
            self._feed_bdat(data)
        else:
            self._lines.feed(data)

    def data_to_send(self) -> bytes:
        """Reply bytes queued since the last call (write them all at once: RFC 2920 asks
        the server to batch replies to a pipelined group)."""
        out = b"".join(self._out)
        self._out.clear()
        return out

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    @property
    def receiving_content(self) -> bool:
        """Message content is coming in: from the 354 (or the first BDAT chunk, RFC 3030) until
        the end of data or the LAST chunk. The span the adapter's data deadline bounds."""
        return self.state in (State.DATA, State.BDAT) or (
            self._data is not None and not self._data.done
        )

    def next_event(self) -> Event | None:
        """Process buffered input until an event needs the caller, or input runs out."""
        if self._waiting is not None:
            return None
        while True:
            if self._ready:
                ev = self._ready.pop(0)
                if not isinstance(ev, CloseEvent):
                    self._waiting = ev
                return ev
            if self.state in (State.CLOSED, State.DATA, State.BDAT, State.GREETING):
                return None
            try:
                line = self._lines.readline()
            except ParseError as e:
                if self.state is State.AUTH and not e.fatal:
                    # RFC 4954 6: the exchange fails; what follows is a command again
                    self.state = State.READY
                    self._lines.max_line = self.config.max_command_line
                    self._error(R.AUTH_LINE_TOO_LONG)
                else:
                    self._parse_error(e)
                continue
            if line is None:
                return None
            if self.state is State.AUTH:
                self._waiting = ev = AuthResponseEvent(line)
                return ev
            ev = self._command(line)
            if ev is not None:
                if not isinstance(ev, CloseEvent):
                    self._waiting = ev
                return ev

    # ------------------------------------------------------------------ answers

    def accept(self, answer: Reply | None = None) -> None:
        """Say yes to the event we are waiting for (MAIL, RCPT, or the stored message)."""
        ev = self._take_waiting()
        if isinstance(ev, MailEvent):
            self.mail = ev.mail
            self.rcpts = []
            self.state = State.MAIL
            self._send(answer or R.SENDER_OK)
        elif isinstance(ev, RcptEvent):
            self.rcpts.append(ev.rcpt)
            self.state = State.RCPT
            self._send(answer or R.RCPT_OK)
        elif isinstance(ev, MessageEvent):
            self._reset_transaction()
            self._send(answer or R.OK)
        else:
            raise RuntimeError(f"accept() does not answer {type(ev).__name__}")

    def reject(self, answer: Reply) -> None:
        """Say no to the event we are waiting for, with the reply the client gets. A refused
        MAIL or RCPT counts as an error, as Postfix counts it towards smtpd_hard_error_limit:
        a client guessing addresses or probing for a relay is cut off after max_errors."""
        ev = self._take_waiting()
        if isinstance(ev, MessageEvent):
            self._reset_transaction()
        elif isinstance(ev, (AuthEvent, AuthResponseEvent)):
            self.state = State.READY
            self._lines.max_line = self.config.max_command_line
        if answer.code == 421:  # RFC 5321 3.8: 421 means the server closes
            self._send(answer)
            self._close("421")
        elif isinstance(ev, (MailEvent, RcptEvent)):
            self._error(answer)
        else:
            self._send(answer)

    def challenge(self, data: bytes) -> None:
        """Continue a SASL exchange: send ``334 base64(data)`` and read one response line."""
        ev = self._take_waiting()
        if not isinstance(ev, (AuthEvent, AuthResponseEvent)):
            raise RuntimeError("challenge() outside AUTH")
        self.state = State.AUTH
        self._lines.max_line = self.config.max_auth_line
        self._out.append(b"334 " + base64.b64encode(data) + b"\r\n")

    def auth_success(self, user: str) -> None:
        self._take_waiting()
        self.user = user
        self.state = State.READY
        self._lines.max_line = self.config.max_command_line
        self._send(R.AUTH_OK)

    def tls_started(self) -> None:
        """The transport now speaks TLS: forget everything learned before (RFC 3207 4.2)."""
        ev = self._take_waiting()
        if not isinstance(ev, StartTLSEvent):
            raise RuntimeError("tls_started() without STARTTLS")
        self.tls = True
        self.helo = None
        self.esmtp = False
        self.user = None
        self._reset_transaction()
        self.state = State.CONNECTED

    def shutdown(self, answer: Reply = R.SHUTTING_DOWN) -> None:
        """The server is going away: say so and close (RFC 5321 3.8)."""
        if self.state is not State.CLOSED:
            self._send(answer)
            self._close("shutdown")

    def timeout(self) -> None:
        """The adapter's timer fired (RFC 5321 4.5.3.2): 421 and close."""
        self.shutdown(reply(421, "4.4.2", f"{self.config.hostname} Error: timeout exceeded"))

    # ------------------------------------------------------------------ internals

    def _take_waiting(self) -> Event:
        ev = self._waiting
        if ev is None:
            raise RuntimeError("no event is waiting for an answer")
        self._waiting = None
        return ev

    def _send(self, r: Reply) -> None:
        self._out.append(R.wire(r))

    def _send_soft(self, r: Reply) -> None:
        self._out.append(R.wire(R.soften(r)))

    def _close(self, reason: str) -> None:
        self.state = State.CLOSED
        self._waiting = None
        self._ready = [CloseEvent(reason)]

    def _error(self, r: Reply) -> None:
        """A client mistake: reply, count it, and hang up after too many (like Postfix's
        smtpd_hard_error_limit)."""
        self._send(r)
        self.errors += 1
        if self.errors >= self.config.max_errors:
            self._send(R.TOO_MANY_ERRORS)
            self._close("too many errors")

    def _parse_error(self, e: ParseError) -> None:
        if e.fatal:
            self._send(reply(e.code, e.enhanced, e.text))
            self._close(e.text)
        else:
            self._error(reply(e.code, e.enhanced, e.text))

    def _sync_error(self, why: str) -> None:
        """Postfix 3.9 smtpd_forbid_unauth_pipelining: the client sent before it could have
        seen our reply where RFC 2920/5321 forbid it; 554 and disconnect."""
        self._send(R.SYNC_ERROR)
        self._close(f"protocol synchronization: {why}")

    def _reset_transaction(self) -> None:
        self.mail = None
        self.rcpts = []
        self._data = None
        self._bdat_failed = None
        if self.state not in (State.CLOSED, State.CONNECTED, State.GREETING):
            self.state = State.READY

    def _pipelined_illegally(self) -> bool:
        """Input is already waiting behind a command after which the client must wait."""
        return self.config.forbid_unauth_pipelining and self._lines.buffered > 0

    def _command(self, line: bytes) -> Event | None:
        verb, arg = parse_command(line)
        handler = _DISPATCH.get(verb)
        if handler is None:
            if verb in _NON_SMTP:
                self._send(reply(221, "2.7.0", "Error: I can break rules, too. Goodbye."))
                self._close("non-SMTP command")
                return self._ready.pop(0)
            self._error(R.UNKNOWN_COMMAND)
            return None
        if (
            not (self.esmtp and self.config.pipelining)
            and verb not in ("EHLO", "QUIT")
            and self.state is not State.CONNECTED
            and self._pipelined_illegally()
        ):
            # PIPELINING was never offered to this client (HELO), so it must wait for each reply.
            self._sync_error(f"pipelined {verb} without PIPELINING")
            return self._ready.pop(0)
        return handler(self, arg)

    # --- HELO/EHLO (RFC 5321 4.1.1.1)

    def _helo(self, arg: bytes, esmtp: bool) -> Event | None:
        name = arg.strip()
        if not name:
            self._error(reply(501, "5.5.4", f"Syntax: {'EHLO' if esmtp else 'HELO'} hostname"))
            return None
        if self._pipelined_illegally():
            # RFC 2920 3.1: EHLO/HELO must be the last command of a group
            self._sync_error("command pipelined after HELO/EHLO")
            return self._ready.pop(0)
        self.helo = name.decode("utf-8", "replace")
        self.esmtp = esmtp
        self._reset_transaction()
        self.state = State.READY
        c = self.config
        if not esmtp:
            self._out.append(_single_line(250, c.hostname))
            return None
        starttls = c.tls_available and not self.tls
        auth = " ".join(c.auth_mechanisms) if self._auth_offered() else None
        self._out.append(
            _ehlo_reply(
                c.hostname,
                c.pipelining,
                c.max_message_size,
                starttls,
                auth,
                c.smtputf8,
                c.chunking,
                c.dsn,
            )
        )
        return None

    def _auth_offered(self) -> bool:
        c = self.config
        if c.auth == "never" or not c.auth_mechanisms or self.user is not None:
            return False
        return c.auth == "always" or self.tls

    def _cmd_ehlo(self, arg: bytes) -> Event | None:
        return self._helo(arg, True)

    def _cmd_helo(self, arg: bytes) -> Event | None:
        return self._helo(arg, False)

    # --- MAIL (4.1.1.2)

    def _cmd_mail(self, arg: bytes) -> Event | None:
        if self.state is State.CONNECTED:
            self._error(R.NEED_HELO)
            return None
        if self.state in (State.MAIL, State.RCPT):
            self._error(R.NESTED_MAIL)
            return None
        if self.config.auth_required and self.user is None:
            self._error(R.AUTH_REQUIRED)
            return None
        try:
            mail = parse_mail(arg)
        except ParseError as e:
            self._parse_error(e)
            return None
        if mail.smtputf8 and not self.config.smtputf8:
            self._error(R.NO_SMTPUTF8)
            return None
        if (mail.ret or mail.envid) and not self.config.dsn:
            self._error(R.NO_DSN)
            return None
        if mail.size is not None and mail.size > self.config.max_message_size:
            self._error(R.SIZE_TOO_BIG)
            return None
        return MailEvent(mail)

    # --- RCPT (4.1.1.3)

    def _cmd_rcpt(self, arg: bytes) -> Event | None:
        if self.state not in (State.MAIL, State.RCPT):
            self._error(R.NEED_MAIL if self.state is not State.CONNECTED else R.NEED_HELO)
            return None
        if len(self.rcpts) >= self.config.max_recipients:
            self._send(R.TOO_MANY_RCPTS)  # 4.5.3.1.10: not an error of the client's
            return None
        try:
            rcpt = parse_rcpt(arg, self.mail.smtputf8 if self.mail else False)
        except ParseError as e:
            self._parse_error(e)
            return None
        if (rcpt.notify or rcpt.orcpt) and not self.config.dsn:
            self._error(R.NO_DSN)
            return None
        return RcptEvent(rcpt)

    # --- DATA (4.1.1.4)

    def _cmd_data(self, arg: bytes) -> Event | None:
        if arg.strip():
            self._error(reply(501, "5.5.4", "Syntax: DATA"))
            return None
        if self.state is State.MAIL:
            # RFC 2920 3.1: with pipelining the client may send DATA although every RCPT failed
            self._error(R.NO_VALID_RCPTS if self.esmtp else R.NEED_RCPT)
            return None
        if self.state is not State.RCPT or self._data is not None:
            # (RFC 3030 2: after a BDAT chunk only BDAT may carry the rest of the message)
            self._error(R.NEED_MAIL if self.state is State.READY else R.BAD_SEQUENCE)
            return None
        if self._pipelined_illegally():
            self._sync_error("message content sent before 354")
            return self._ready.pop(0)
        c = self.config
        self._data = DataReader(
            c.max_message_size, c.max_line_length, c.bare_newline == "normalize", MODE_WIRE
        )
        self.state = State.DATA
        self._send(R.START_DATA)
        rest = self._lines.take()
        if rest:
            self._feed_data(rest)
        return None

    def _feed_data(self, data: bytes) -> None:
        reader = self._data
        assert reader is not None
        try:
            used = reader.feed(data)
        except ParseError as e:
            self._parse_error(e)
            return
        if not reader.done:
            return
        self._finish_message(reader)
        if used < len(data):
            self._lines.feed(data[used:])

    def _finish_message(self, reader: DataReader) -> None:
        self.state = State.RCPT
        err = reader.error
        if err is not None:
            self._reset_transaction()
            self._send(reply(err.code, err.enhanced, err.text))
            return
        assert self.mail is not None
        self._ready.append(MessageEvent(self.mail, list(self.rcpts), reader.take(), reader.size))

    # --- BDAT (RFC 3030)

    def _cmd_bdat(self, arg: bytes) -> Event | None:
        parts = arg.split()
        if (
            not self.config.chunking
            or not parts
            or len(parts) > 2
            or not parts[0].isdigit()
            or len(parts[0]) > _MAX_BDAT_DIGITS
            or (len(parts) == 2 and parts[1].upper() != b"LAST")
        ):
            # without a valid size we cannot know where the chunk ends: the stream is lost
            self._send(reply(501, "5.5.4", "Syntax: BDAT chunk-size [LAST]"))
            self._close("bad BDAT")
            return self._ready.pop(0)
        size = int(parts[0])
        self._bdat_last = len(parts) == 2
        if self.state is not State.RCPT:
            # RFC 3030 2: the chunk is read and thrown away, then 503/554
            if self._bdat_failed is None:
                self._bdat_failed = R.NO_VALID_RCPTS if self.state is State.MAIL else R.NEED_MAIL
        elif self._data is None:
            c = self.config
            self._data = DataReader(
                c.max_message_size, c.max_line_length, c.bare_newline == "normalize", MODE_BDAT
            )
        self._bdat_left = size
        self._bdat_prev = self.state
        self.state = State.BDAT
        rest = self._lines.take()
        if size == 0:
            self._end_bdat_chunk()
        if rest:
            self.receive(rest)
        return None

    def _feed_bdat(self, data: bytes) -> None:
        take = min(self._bdat_left, len(data))
        chunk, rest = data[:take], data[take:]
        self._bdat_left -= take
        if self._data is not None and self._bdat_failed is None and chunk:
            try:
                self._data.feed(chunk)
            except ParseError as e:
                self._parse_error(e)
                return
        if self._bdat_left == 0:
            self._end_bdat_chunk()
        if rest:
            self.receive(rest)

    def _end_bdat_chunk(self) -> None:
        self.state = self._bdat_prev
        reader = self._data
        if self._bdat_failed is not None:
            self._error(self._bdat_failed)
            if self._bdat_last:
                self._reset_transaction()
            return
        assert reader is not None
        if not self._bdat_last:
            if reader.error is not None:
                err = reader.error
                self._bdat_failed = R.BAD_SEQUENCE  # RFC 3030 4.2: no more chunks
                self._send(reply(err.code, err.enhanced, err.text))
                return
            self._send(reply(250, "2.0.0", f"Ok: {reader.size} octets"))
            return
        try:
            reader.finish()
        except ParseError as e:
            self._parse_error(e)
            return
        self.state = State.RCPT
        self._finish_message(reader)

    # --- the rest

    def _cmd_rset(self, arg: bytes) -> Event | None:
        if self.state is not State.CONNECTED:
            self._reset_transaction()
        self._send(R.RESET_OK)
        return None

    def _cmd_noop(self, arg: bytes) -> Event | None:
        self._send(R.OK)
        return None

    def _cmd_quit(self, arg: bytes) -> Event | None:
        self._send(R.BYE)
        self._close("quit")
        return self._ready.pop(0)

    def _cmd_vrfy(self, arg: bytes) -> Event | None:
        if not arg.strip():
            self._error(reply(501, "5.5.4", "Syntax: VRFY address"))
            return None
        self._send(R.VRFY_CANNOT)  # 3.5.3: 252 rather than disclose users
        return None

    def _cmd_expn(self, arg: bytes) -> Event | None:
        self._error(R.NOT_IMPLEMENTED)
        return None

    def _cmd_help(self, arg: bytes) -> Event | None:
        self._send(R.HELP)
        return None

    def _cmd_starttls(self, arg: bytes) -> Event | None:
        if arg.strip():
            self._error(reply(501, "5.5.4", "Syntax: STARTTLS"))
            return None
        if self.tls:
            self._error(R.ALREADY_TLS)
            return None
        if not self.config.tls_available:
            self._error(R.NOT_IMPLEMENTED)
            return None
        if self.state is State.CONNECTED:
            self._error(R.NEED_HELO)
            return None
        if self._lines.buffered:
            # RFC 3207 5: anything pipelined after STARTTLS is a command injection attempt
            self._sync_error("input after STARTTLS")
            return self._ready.pop(0)
        self._send(R.READY_TLS)
        return StartTLSEvent()

    def _cmd_auth(self, arg: bytes) -> Event | None:
        if self.user is not None:
            self._error(R.ALREADY_AUTH)
            return None
        if self.state in (State.MAIL, State.RCPT):
            self._error(R.AUTH_NOT_NOW)  # RFC 4954 4: not during a transaction
            return None
        if not self.esmtp or self.state is State.CONNECTED:
            self._error(R.NEED_HELO)
            return None
        parts = arg.split()
        if not parts or len(parts) > 2:
            self._error(reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]"))
            return None
        mech = parts[0].decode("ascii", "replace").upper()
        if self.config.auth == "never" or mech not in self.config.auth_mechanisms:
            self._error(reply(504, "5.5.4", "Unrecognized authentication type"))
            return None
        if not self._auth_offered():
            self._error(R.ENCRYPTION_REQUIRED)
            return None
        self.state = State.AUTH
        return AuthEvent(mech, parts[1] if len(parts) == 2 else None)


_DISPATCH = {
    "EHLO": ServerSession._cmd_ehlo,
    "HELO": ServerSession._cmd_helo,
    "MAIL": ServerSession._cmd_mail,
    "RCPT": ServerSession._cmd_rcpt,
    "DATA": ServerSession._cmd_data,
    "BDAT": ServerSession._cmd_bdat,
    "RSET": ServerSession._cmd_rset,
    "NOOP": ServerSession._cmd_noop,
    "QUIT": ServerSession._cmd_quit,
    "VRFY": ServerSession._cmd_vrfy,
    "EXPN": ServerSession._cmd_expn,
    "HELP": ServerSession._cmd_help,
    "STARTTLS": ServerSession._cmd_starttls,
    "AUTH": ServerSession._cmd_auth,
}
