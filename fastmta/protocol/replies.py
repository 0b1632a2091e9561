"""SMTP replies: codes, enhanced status codes (RFC 3463), and the EHLO capability map.

Pure data, no I/O. Both directions use :class:`Reply`: the server session formats the
replies it sends with :meth:`Reply.to_bytes`, the client session receives replies parsed by
the reply reader of :mod:`fastmta.protocol.parse`.
"""

from __future__ import annotations

import msgspec


class Reply(msgspec.Struct, frozen=True, gc=False):
    """One SMTP reply (RFC 5321 4.2): a three-digit code, an optional enhanced status code
    (RFC 3463, RFC 2034) and one or more lines of text."""

    code: int
    enhanced: str | None = None
    lines: tuple[str, ...] = ()

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def is_positive(self) -> bool:
        return 200 <= self.code < 400

    def is_transient(self) -> bool:
        """4yz: transient negative completion (RFC 5321 4.2.1); try again later."""
        return 400 <= self.code < 500

    def is_permanent(self) -> bool:
        """5yz: permanent negative completion (RFC 5321 4.2.1); do not retry."""
        return self.code >= 500

    def to_bytes(self) -> bytes:
        """Wire form: ``250-first`` ... ``250 last`` with the enhanced code on every line
        (RFC 2034 section 4 asks for it on each line of a multi-line reply)."""
        lines = self.lines or ("",)
        prefix = f"{self.enhanced} " if self.enhanced else ""
        last = len(lines) - 1
        out = [
            f"{self.code}{' ' if i == last else '-'}{prefix}{line}\r\n"
            for i, line in enumerate(lines)
        ]
        return "".join(out).encode("utf-8", "replace")

    def __str__(self) -> str:
        prefix = f"{self.enhanced} " if self.enhanced else ""
        return f"{self.code} {prefix}{self.text}"


def reply(code: int, enhanced: str | None, *lines: str) -> Reply:
    """Shorthand: ``reply(250, "2.1.0", "Ok")``."""
    return Reply(code, enhanced, tuple(lines))


class Capabilities(msgspec.Struct, gc=False):
    """What a server offered in its EHLO reply (RFC 5321 4.1.1.1 and the extension RFCs)."""

    esmtp: bool = True
    pipelining: bool = False  # RFC 2920
    size: int | None = None  # RFC 1870; 0 = no fixed limit
    eightbitmime: bool = False  # RFC 6152
    smtputf8: bool = False  # RFC 6531
    starttls: bool = False  # RFC 3207
    auth: frozenset[str] = frozenset()  # RFC 4954
    chunking: bool = False  # RFC 3030
    binarymime: bool = False  # RFC 3030
    dsn: bool = False  # RFC 3461
    enhancedstatuscodes: bool = False  # RFC 2034
    keywords: dict[str, str] = {}


def parse_ehlo(r: Reply) -> Capabilities:
    """Turn a 250 EHLO reply into a capability map. The first line is the server's greeting
    name; every further line is ``KEYWORD [params]`` (RFC 5321 4.1.1.1)."""
    caps = Capabilities(keywords={})
    for line in r.lines[1:]:
        keyword, _, params = line.strip().partition(" ")
        keyword = keyword.upper()
        caps.keywords[keyword] = params
        if keyword == "PIPELINING":
            caps.pipelining = True
        elif keyword == "SIZE":
            caps.size = int(v) if (v := params.strip()).isascii() and v.isdigit() else 0
        elif keyword == "8BITMIME":
            caps.eightbitmime = True
        elif keyword == "SMTPUTF8":
            caps.smtputf8 = True
        elif keyword == "STARTTLS":
            caps.starttls = True
        elif keyword == "AUTH" or keyword.startswith("AUTH="):
            # "AUTH=LOGIN PLAIN" is the pre-RFC 4954 form some servers still send.
            mechs = params if keyword == "AUTH" else keyword[5:] + " " + params
            caps.auth = caps.auth | frozenset(m.upper() for m in mechs.split())
        elif keyword == "CHUNKING":
            caps.chunking = True
        elif keyword == "BINARYMIME":
            caps.binarymime = True
        elif keyword == "DSN":
            caps.dsn = True
        elif keyword == "ENHANCEDSTATUSCODES":
            caps.enhancedstatuscodes = True
    return caps


# Replies the server session sends, in one place. Section numbers point at RFC 5321
# unless another RFC is named.
OK = reply(250, "2.0.0", "Ok")
SENDER_OK = reply(250, "2.1.0", "Ok")
RCPT_OK = reply(250, "2.1.5", "Ok")
RESET_OK = reply(250, "2.0.0", "Ok")
START_DATA = reply(354, None, "End data with <CR><LF>.<CR><LF>")
BYE = reply(221, "2.0.0", "Bye")
VRFY_CANNOT = reply(252, "2.0.0", "Cannot VRFY user, but will accept message and attempt delivery")
HELP = reply(214, "2.0.0", "See https://www.rfc-editor.org/rfc/rfc5321")
READY_TLS = reply(220, "2.0.0", "Ready to start TLS")
AUTH_OK = reply(235, "2.7.0", "Authentication successful")

LINE_TOO_LONG = reply(500, "5.5.2", "Line too long")  # 4.5.3.1.4
UNKNOWN_COMMAND = reply(500, "5.5.2", "Error: command not recognized")
NOT_IMPLEMENTED = reply(502, "5.5.1", "Error: command not implemented")
BAD_SEQUENCE = reply(503, "5.5.1", "Error: bad sequence of commands")
NEED_MAIL = reply(503, "5.5.1", "Error: need MAIL command")
NEED_RCPT = reply(503, "5.5.1", "Error: need RCPT command")
NESTED_MAIL = reply(503, "5.5.1", "Error: nested MAIL command")
NEED_HELO = reply(503, "5.5.1", "Error: send HELO/EHLO first")
ALREADY_TLS = reply(503, "5.5.1", "Error: TLS already active")
ALREADY_AUTH = reply(503, "5.5.1", "Error: already authenticated")
AUTH_NOT_NOW = reply(503, "5.5.1", "Error: MAIL transaction in progress")
NO_VALID_RCPTS = reply(554, "5.5.1", "Error: no valid recipients")  # RFC 2920 3.1
AUTH_REQUIRED = reply(530, "5.7.0", "Authentication required")  # RFC 4954 6
AUTH_LINE_TOO_LONG = reply(500, "5.5.6", "Authentication Exchange line is too long")  # RFC 4954 6
MUST_STARTTLS = reply(530, "5.7.0", "Must issue a STARTTLS command first")  # RFC 3207 4
ENCRYPTION_REQUIRED = reply(
    538, "5.7.11", "Encryption required for requested authentication mechanism"
)
TOO_MANY_RCPTS = reply(452, "4.5.3", "Error: too many recipients")  # 4.5.3.1.10
TOO_BIG = reply(552, "5.3.4", "Error: message file too big")  # RFC 1870 6.3
SIZE_TOO_BIG = reply(552, "5.3.4", "Message size exceeds fixed limit")  # RFC 1870 6.2
DATA_LINE_TOO_LONG = reply(500, "5.5.2", "Error: message line too long")  # 4.5.3.1.6
BARE_NEWLINE = reply(521, "5.5.2", "Error: bare <CR> or <LF> received")  # Postfix 3.9 'reject'
SYNC_ERROR = reply(554, "5.5.0", "Error: SMTP protocol synchronization")  # Postfix 3.9
TOO_MANY_ERRORS = reply(421, "4.7.0", "Error: too many errors")
NO_SMTPUTF8 = reply(555, "5.5.4", "Error: SMTPUTF8 not supported")  # RFC 6531 3.4
NO_DSN = reply(555, "5.5.4", "Error: DSN parameters not supported")  # RFC 3461 (not offered)
SHUTTING_DOWN = reply(421, "4.3.2", "Service shutting down")  # 3.8
TLS_NOT_AVAILABLE = reply(454, "4.7.0", "TLS not available due to temporary reason")  # RFC 3207 4


def soften(r: Reply) -> Reply:
    """A 5xx reply as the 4xx it becomes under soft_bounce (550 5.1.1 -> 450 4.1.1); any other
    reply as it is. The client keeps the mail and tries again later."""
    if r.code < 500:
        return r
    enhanced = "4" + r.enhanced[1:] if r.enhanced and r.enhanced[0] == "5" else r.enhanced
    return Reply(r.code - 100, enhanced, r.lines)


def wire(r: Reply) -> bytes:
    """``r.to_bytes()``, taken from a table for the constant replies above: the server sends
    several of them per message, and formatting one costs more than looking it up."""
    b = _WIRE.get(r)
    return b if b is not None else r.to_bytes()


_WIRE: dict[Reply, bytes] = {
    v: v.to_bytes() for v in list(globals().values()) if isinstance(v, Reply)
}
