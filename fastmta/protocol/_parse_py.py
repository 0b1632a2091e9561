"""Pure-Python twin of ext/_parse.pyx: the SMTP parser, sans-IO.

Same API, same results, same errors as the compiled module; one test suite runs on both
(tests/test_parse*.py, ids "c" and "py"). Change one, change the other.

Contracts that hold for every class here: no I/O, no await; input arrives in chunks split
anywhere; nothing already scanned is scanned again; every buffer is bounded.
"""

from __future__ import annotations

import re

from .errors import MailFrom, ParseError, RcptTo
from .replies import Reply

ACCELERATED = False

CR = 13
LF = 10
DOT = 46

# --------------------------------------------------------------------------------------
# Command lines (server side)
# --------------------------------------------------------------------------------------

ERR_LINE_TOO_LONG = (500, "5.5.2", "Line too long")  # RFC 5321 4.5.3.1.4
ERR_BARE_LF = (521, "5.5.2", "Error: bare <LF> received")  # Postfix 3.9 smtpd_forbid_bare_newline
ERR_BARE_CR = (521, "5.5.2", "Error: bare <CR> received")
ERR_TOO_BIG = (552, "5.3.4", "Error: message file too big")  # RFC 1870 6.3
ERR_DATA_LINE = (500, "5.5.2", "Error: message line too long")  # RFC 5321 4.5.3.1.6
# A NUL is not text (RFC 5322 2.2, RFC 6152 3: not even in 8BITMIME), and a relay that strips it
# could turn "CRLF NUL . CRLF" into an end of data: the message is read to its end and refused.
ERR_NUL = (554, "5.6.0", "Error: NUL character in message content")


def _bytes(data: bytes) -> bytes:
    """``data`` as exact bytes (a bytearray or memoryview is copied once, as the compiled
    module does)."""
    return data if type(data) is bytes else bytes(data)


def _fatal(err: tuple[int, str, str]) -> ParseError:
    return ParseError(err[0], err[1], err[2], True)


class LineReader:
    """CRLF-framed command lines (RFC 5321 2.3.8).

    ``max_line`` counts the CRLF: 512 octets for commands (4.5.3.1.4); the session raises it
    for AUTH continuation lines, which carry base64 and may be longer (RFC 4954 4).
    A bare CR anywhere, or a bare LF unless ``normalize``, is a fatal error.
    """

    def __init__(self, max_line: int = 512, normalize: bool = False) -> None:
        self.max_line = max_line
        self.normalize = normalize
        self._buf = bytearray()
        self._pos = 0  # start of the unconsumed bytes in _buf
        self._scan = 0  # where the search for LF resumes: nothing is scanned twice
        self._discard = False  # dropping the rest of an over-long line

    def feed(self, data: bytes) -> None:
        data = _bytes(data)
        if self._discard:
            i = data.find(b"\n")
            if i < 0:
                return
            self._discard = False
            data = data[i + 1 :]
        if self._pos:  # drop consumed lines: bounded even when every feed ends mid-line
            del self._buf[: self._pos]
            self._scan -= self._pos
            self._pos = 0
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as a line."""
        return len(self._buf) - self._pos

    def take(self) -> bytes:
        """Return and forget every buffered byte (the session switches to DATA, BDAT or TLS)."""
        out = bytes(self._buf[self._pos :])
        self._buf.clear()
        self._pos = self._scan = 0
        return out

    def readline(self) -> bytes | None:
        """The next complete line without its CRLF, or None until one has arrived.

        Raises ParseError: non-fatal for a line over ``max_line`` (the line is dropped),
        fatal for a bare CR or LF."""
        buf = self._buf
        start = self._pos
        lf = buf.find(b"\n", max(self._scan, start))
        if lf < 0:
            if len(buf) - start > self.max_line:
                # 4.5.3.1.4: over-long; drop what we have and the rest up to the next LF.
                self._buf.clear()
                self._pos = self._scan = 0
                self._discard = True
                raise ParseError(*ERR_LINE_TOO_LONG)
            self._scan = len(buf)
            return None
        self._pos = self._scan = lf + 1
        if lf + 1 - start > self.max_line:
            raise ParseError(*ERR_LINE_TOO_LONG)
        if lf > start and buf[lf - 1] == CR:
            end = lf - 1
        elif self.normalize:
            end = lf
        else:
            raise _fatal(ERR_BARE_LF)
        if buf.find(b"\r", start, end) >= 0:
            raise _fatal(ERR_BARE_CR)
        return bytes(buf[start:end])


def parse_command(line: bytes) -> tuple[str, bytes]:
    """Split a command line into (VERB, argument). The verb is upper-cased ASCII
    (RFC 5321 2.4: verbs are case-insensitive); the argument keeps its bytes."""
    line = _bytes(line)
    sp = line.find(b" ")
    if sp < 0:
        verb, arg = line, b""
    else:
        verb, arg = line[:sp], line[sp + 1 :]
    return verb.decode("latin-1").upper(), arg


# --------------------------------------------------------------------------------------
# MAIL FROM / RCPT TO (RFC 5321 4.1.2, RFC 6531 3.3, RFC 1870, RFC 6152, RFC 3461)
# --------------------------------------------------------------------------------------

# atext (RFC 5322 3.2.3): ALPHA / DIGIT / "!#$%&'*+-/=?^_`{|}~"
_ATEXT = frozenset(
    b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~"
)
_LETDIG = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_DIGITS = frozenset(b"0123456789")

MAX_LOCAL = 64  # 4.5.3.1.1
MAX_DOMAIN = 255  # 4.5.3.1.2
MAX_PATH = 256  # 4.5.3.1.3, including the angle brackets
MAX_ENVID = 100  # RFC 3461 4.4

ERR_MAIL_SYNTAX = (501, "5.5.4", "Syntax: MAIL FROM:<address>")
ERR_RCPT_SYNTAX = (501, "5.5.4", "Syntax: RCPT TO:<address>")
ERR_SENDER = (501, "5.1.7", "Bad sender address syntax")
ERR_RCPT = (501, "5.1.3", "Bad recipient address syntax")
ERR_PATH_LONG = (501, "5.5.4", "Path too long")  # 4.5.3.1.3
ERR_LOCAL_LONG = (501, "5.5.4", "Local part too long")  # 4.5.3.1.1
ERR_DOMAIN_LONG = (501, "5.5.4", "Domain too long")  # 4.5.3.1.2
ERR_UTF8 = (553, "5.6.7", "Non-ASCII address requires SMTPUTF8")  # RFC 6531 3.5
ERR_PARAM = (501, "5.5.4", "Bad parameter syntax")
ERR_DUP = (501, "5.5.4", "Duplicate parameter")


def _err(err: tuple[int, str, str], detail: str = "") -> ParseError:
    code, enh, text = err
    return ParseError(code, enh, f"{text}: {detail}" if detail else text)


def _mailbox_end(s: bytes, i: int, n: int, bad: tuple[int, str, str]) -> int:
    """Scan a Mailbox (local-part "@" domain, or a bare postmaster) starting at s[i].
    Returns the index of the closing ">". Raises ``bad`` on a grammar error."""
    # Local-part = Dot-string / Quoted-string (4.1.2)
    if i < n and s[i] == 34:  # DQUOTE
        i += 1
        while True:
            if i >= n:
                raise _err(bad)
            c = s[i]
            if c == 34:
                i += 1
                break
            if c == 92:  # quoted-pairSMTP = %d92 %d32-126
                if i + 1 >= n or not (32 <= s[i + 1] <= 126):
                    raise _err(bad)
                i += 2
            elif 32 <= c <= 126 or c >= 128:  # qtextSMTP (+ UTF8-non-ascii, RFC 6531)
                i += 1
            else:
                raise _err(bad)
    else:
        atom = 0
        while i < n:
            c = s[i]
            if c in _ATEXT or c >= 128:
                atom += 1
            elif c == DOT and atom:
                atom = 0
            else:
                break
            i += 1
        if not atom:  # empty, leading/trailing or double dot
            raise _err(bad)
    return i


def _domain_end(s: bytes, i: int, n: int, bad: tuple[int, str, str]) -> int:
    """Scan Domain / address-literal from s[i]; return the index after it."""
    if i < n and s[i] == 91:  # "[" address-literal (4.1.3)
        j = s.find(b"]", i)
        if j < 0:
            raise _err(bad)
        if not _valid_literal(s[i + 1 : j]):
            raise _err(bad)
        return j + 1
    # Domain = sub-domain *("." sub-domain); sub-domain = Let-dig [Ldh-str]; an ASCII label
    # has at most 63 octets (RFC 1035 2.3.4; a UTF-8 label is measured as its A-label, later)
    label = 0
    utf8 = False
    last = 0
    while i < n:
        c = s[i]
        if c in _LETDIG or c >= 128:
            label += 1
            utf8 = utf8 or c >= 128
        elif c == 45 and label:  # "-" not first
            label += 1
        elif c == DOT and label and last != 45:
            label = 0
            utf8 = False
        else:
            break
        if label > 63 and not utf8:
            raise _err(bad)
        last = c
        i += 1
    if not label or last == 45:
        raise _err(bad)
    return i


def _valid_literal(lit: bytes) -> bool:
    """address-literal contents (4.1.3): IPv4, "IPv6:" IPv6, or General-address-literal."""
    if lit[:5].lower() == b"ipv6:":
        body = lit[5:]
        if not body or any(c not in _HEX and c not in (58, 46) for c in body):
            return False
        import ipaddress

        try:
            ipaddress.IPv6Address(body.decode("ascii"))
        except ValueError:
            return False
        return True
    parts = lit.split(b".")
    if len(parts) == 4 and all(
        0 < len(p) <= 3 and all(c in _DIGITS for c in p) and int(p) <= 255 for p in parts
    ):
        return True
    # General-address-literal = Standardized-tag ":" 1*dcontent (dcontent %d33-90 / %d94-126)
    colon = lit.find(b":")
    if colon <= 0:
        return False
    tag, rest = lit[:colon], lit[colon + 1 :]
    if not all(c in _LETDIG or c == 45 for c in tag) or tag[-1] == 45 or not rest:
        return False
    return all(33 <= c <= 90 or 94 <= c <= 126 for c in rest)


def _parse_path(
    s: bytes, i: int, n: int, bad: tuple[int, str, str], allow_null: bool, allow_postmaster: bool
) -> tuple[str, int, bool]:
    """Parse ``<path>`` at s[i]. Returns (address, index after ">", has_8bit)."""
    if i >= n or s[i] != 60:  # "<"
        raise _err(bad)
    start = i
    i += 1
    if i < n and s[i] == 62:  # "<>"
        if not allow_null:
            raise _err(bad)
        return "", i + 1, False
    # A-d-l: source route "@a,@b:" is accepted and ignored (4.1.1.3, Appendix C)
    if i < n and s[i] == 64:
        colon = s.find(b":", i)
        if colon < 0:
            raise _err(bad)
        for hop in s[i:colon].split(b","):
            if len(hop) < 2 or hop[0] != 64 or _domain_end(hop, 1, len(hop), bad) != len(hop):
                raise _err(bad)
        i = colon + 1
    mstart = i
    i = _mailbox_end(s, i, n, bad)
    local_len = i - mstart
    if i < n and s[i] == 62 and allow_postmaster and s[mstart:i].lower() == b"postmaster":
        end = i
    else:
        if i >= n or s[i] != 64:
            raise _err(bad)
        dstart = i + 1
        i = _domain_end(s, dstart, n, bad)
        if i >= n or s[i] != 62:
            raise _err(bad)
        if i - dstart > MAX_DOMAIN:
            raise _err(ERR_DOMAIN_LONG)
        end = i
    if local_len > MAX_LOCAL:
        raise _err(ERR_LOCAL_LONG)
    if end + 1 - start > MAX_PATH:
        raise _err(ERR_PATH_LONG)
    raw = s[mstart:end]
    eight = False
    for c in raw:
        if c >= 128:
            eight = True
            break
    if eight:
        try:
            address = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _err(bad) from None
    else:
        address = raw.decode("ascii")
    return address, end + 1, eight


def _params(s: bytes, i: int, n: int) -> list[tuple[str, bytes | None]]:
    """esmtp-param *(SP esmtp-param) (4.1.2). Keywords upper-cased; values as bytes."""
    out: list[tuple[str, bytes | None]] = []
    seen: set[str] = set()
    while i < n:
        if s[i] != 32:
            raise _err(ERR_PARAM)
        while i < n and s[i] == 32:
            i += 1
        if i >= n:
            break
        j = s.find(b" ", i)
        if j < 0:
            j = n
        tok = s[i:j]
        eq = tok.find(b"=")
        kw = tok if eq < 0 else tok[:eq]
        # esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-")
        if not kw or kw[0] not in _LETDIG or any(c not in _LETDIG and c != 45 for c in kw):
            raise _err(ERR_PARAM)
        value = None
        if eq >= 0:
            value = tok[eq + 1 :]
            # esmtp-value = 1*(%d33-60 / %d62-126), UTF-8 allowed by RFC 6531 3.3
            if not value or any(c < 33 or c == 61 or c == 127 for c in value):
                raise _err(ERR_PARAM)
        key = kw.decode("ascii").upper()
        if key in seen:
            raise _err(ERR_DUP, key)
        seen.add(key)
        out.append((key, value))
        i = j
    return out


def _xtext_ok(v: bytes) -> bool:
    """xtext (RFC 3461 4): xchar = %d33-42 / %d44-60 / %d62-126; hexchar = "+" 2HEX."""
    i, n = 0, len(v)
    while i < n:
        c = v[i]
        if c == 43:  # "+"
            if i + 2 >= n or v[i + 1] not in _HEX or v[i + 2] not in _HEX:
                return False
            i += 3
        elif 33 <= c <= 126 and c != 61:
            i += 1
        else:
            return False
    return True


def _skip_keyword(s: bytes, kw: bytes, syntax: tuple[int, str, str]) -> int:
    """Match "FROM:" / "TO:" case-insensitively; allow spaces after the colon (Postfix and
    most MTAs accept ``MAIL FROM: <a@b>``)."""
    n = len(kw)
    if s[:n].upper() != kw:
        raise _err(syntax)
    i = n
    while i < len(s) and s[i] == 32:
        i += 1
    return i


def parse_mail(arg: bytes) -> MailFrom:
    """Parse the argument of MAIL (``FROM:<path> [params]``). Raises ParseError."""
    arg = _bytes(arg)
    n = len(arg)
    i = _skip_keyword(arg, b"FROM:", ERR_MAIL_SYNTAX)
    address, i, eight = _parse_path(arg, i, n, ERR_SENDER, True, False)
    m = MailFrom(address)
    for key, value in _params(arg, i, n):
        if key == "SIZE":
            if value is None or len(value) > 20 or any(c not in _DIGITS for c in value):
                raise _err(ERR_PARAM, "SIZE")
            m.size = int(value)
        elif key == "BODY":
            v = value.upper() if value is not None else b""
            if v == b"7BIT" or v == b"8BITMIME":
                m.body = v.decode()
            else:
                raise _err(ERR_PARAM, "BODY")
        elif key == "SMTPUTF8":
            if value is not None:
                raise _err(ERR_PARAM, "SMTPUTF8")
            m.smtputf8 = True
        elif key == "RET":
            v = value.upper() if value is not None else b""
            if v == b"FULL" or v == b"HDRS":
                m.ret = v.decode()
            else:
                raise _err(ERR_PARAM, "RET")
        elif key == "ENVID":
            if value is None or len(value) > MAX_ENVID or not _xtext_ok(value):
                raise _err(ERR_PARAM, "ENVID")
            m.envid = value.decode("ascii")
        elif key == "AUTH":  # RFC 4954 5: xtext or "<>"
            if value is None or not (value == b"<>" or _xtext_ok(value)):
                raise _err(ERR_PARAM, "AUTH")
            m.auth = value.decode("ascii")
        else:
            raise ParseError(555, "5.5.4", f"Unsupported option: {key}")  # 4.1.1.11
    if eight and not m.smtputf8:
        raise _err(ERR_UTF8)
    return m


_NOTIFY = (b"SUCCESS", b"FAILURE", b"DELAY")


def parse_rcpt(arg: bytes, smtputf8: bool = False) -> RcptTo:
    """Parse the argument of RCPT (``TO:<path> [params]``). ``smtputf8``: the transaction's
    MAIL carried SMTPUTF8, so UTF-8 addresses are allowed (RFC 6531 3.4)."""
    arg = _bytes(arg)
    n = len(arg)
    i = _skip_keyword(arg, b"TO:", ERR_RCPT_SYNTAX)
    address, i, eight = _parse_path(arg, i, n, ERR_RCPT, False, True)
    r = RcptTo(address)
    for key, value in _params(arg, i, n):
        if key == "NOTIFY":
            if value is None:
                raise _err(ERR_PARAM, "NOTIFY")
            v = value.upper()
            if v != b"NEVER":
                items = v.split(b",")
                if len(set(items)) != len(items) or any(x not in _NOTIFY for x in items):
                    raise _err(ERR_PARAM, "NOTIFY")
            r.notify = v.decode("ascii")
        elif key == "ORCPT":
            # orcpt-parameter = "ORCPT=" addr-type ";" xtext (RFC 3461 4.2)
            semi = value.find(b";") if value is not None else -1
            if semi <= 0 or not all(c in _LETDIG or c == 45 for c in value[:semi]):
                raise _err(ERR_PARAM, "ORCPT")
            if not _xtext_ok(value[semi + 1 :]) and not (
                value[:semi].lower() == b"utf-8" and smtputf8
            ):
                raise _err(ERR_PARAM, "ORCPT")
            r.orcpt = value.decode("utf-8", "replace")
        else:
            raise ParseError(555, "5.5.4", f"Unsupported option: {key}")
    if eight and not smtputf8:
        raise _err(ERR_UTF8)
    return r


# --------------------------------------------------------------------------------------
# DATA content and BDAT chunks (RFC 5321 4.1.1.4, 4.5.2; RFC 3030)
# --------------------------------------------------------------------------------------

MODE_UNSTUFF = 0  # DATA: output is the content, dot-stuffing removed
MODE_WIRE = 1  # DATA: output is wire form (dot-stuffed, CRLF), without the final ".\r\n"
MODE_BDAT = 2  # BDAT: no end marker in-band; output is stuffed into wire form

# States of the content scanner
S_BOL = 0  # at the beginning of a line
S_MID = 1  # inside a line
S_CR = 2  # just after a CR; only LF may follow
S_DOT = 3  # a "." at the beginning of a line (DATA only): stuffing or the end marker
S_DOTCR = 4  # ".\r" at the beginning of a line: only LF may follow (end of data)

_EOL_NUL_RE = re.compile(b"[\r\n\x00]")


class DataReader:
    """Message content after DATA (or inside BDAT chunks), incremental.

    Only ``CRLF . CRLF`` ends DATA (4.1.1.4); a bare CR is always fatal; a bare LF is fatal
    unless ``normalize`` (then it counts as CRLF but a lone "." line ended by a bare LF never
    ends data: SMTP smuggling). Lines longer than ``max_line`` octets including the line
    ending (4.5.3.1.6; a transparency dot does not count), content over ``max_size`` (RFC
    1870: the message as the client has it, without transparency dots) and a NUL anywhere
    are not fatal: scanning goes on to the end so the session stays in sync, nothing more is
    handed on, and :attr:`error` says what to answer.

    Output: ``take()`` returns the content as a few large chunks (slices of the input
    between the places where bytes are dropped or inserted). In ``MODE_WIRE`` and
    ``MODE_BDAT`` the output is wire form, ready for the spool and for delivery as is.
    """

    def __init__(
        self,
        max_size: int,
        max_line: int = 1000,
        normalize: bool = False,
        mode: int = MODE_UNSTUFF,
    ) -> None:
        self.max_size = max_size
        self.max_line = max_line
        self.normalize = normalize
        self.mode = mode
        self.done = False
        self.size = 0  # octets of content without transparency dots (counted when not kept)
        self.line_too_long = False
        self.nul = False  # a NUL was seen
        self._state = S_BOL
        self._line = 0  # octets of the current line so far, as received
        self._lf = False  # the previous line ended in a bare LF (normalize): no end marker now
        self._chunks: list[bytes] = []

    @property
    def too_big(self) -> bool:
        return self.size > self.max_size

    @property
    def error(self) -> ParseError | None:
        """The reply for a content that was read to its end but must be refused."""
        if self.size > self.max_size:
            return ParseError(*ERR_TOO_BIG)
        if self.line_too_long:
            return ParseError(*ERR_DATA_LINE)
        if self.nul:
            return ParseError(*ERR_NUL)
        return None

    def take(self) -> list[bytes]:
        """Content produced since the last call (nothing once an error is known)."""
        out = self._chunks
        self._chunks = []
        return out

    def _emit(self, piece: bytes) -> None:
        if piece:
            self.size += len(piece)
            if self.size <= self.max_size and not self.line_too_long and not self.nul:
                self._chunks.append(piece)
            elif self._chunks:
                self._chunks.clear()

    def feed(self, data: bytes) -> int:
        """Scan ``data``; return how many octets belong to the content (for DATA, up to and
        including the final ".\\r\\n"; the rest are the next commands). Raises a fatal
        ParseError on a bare CR or (unless normalizing) a bare LF."""
        if self.done:
            return 0
        data = _bytes(data)
        n = len(data)
        i = 0
        out = 0  # start of the pending output span in data
        dot_at = -1  # index of a held-back line-start "." in this chunk (-1: none or earlier)
        state = self._state
        line = self._line
        lf = self._lf
        max_line = self.max_line
        mode = self.mode
        search = _EOL_NUL_RE.search
        while i < n:
            if state == S_MID:
                m = search(data, i)
                if m is None:
                    line += n - i
                    i = n
                    if line > max_line:
                        self.line_too_long = True
                    break
                j = m.start()
                line += j - i + 1
                i = j + 1
                c = data[j]
                if c == 0:
                    self.nul = True
                    self._chunks.clear()
                    continue
                if c == CR:
                    if line > max_line:
                        self.line_too_long = True
                    state = S_CR
                    continue
                # bare LF ends a line
                if not self.normalize:
                    raise _fatal(ERR_BARE_LF)
                line += 1  # stored as CRLF
                if line > max_line:
                    self.line_too_long = True
                self._emit(data[out:j])
                self._emit(b"\r\n")
                out = i
                state = S_BOL
                line = 0
                lf = True
                continue
            c = data[i]
            if state == S_BOL:
                if c == DOT:
                    i += 1
                    if mode == MODE_BDAT:
                        # content; the output gets an extra "." before it (not counted)
                        line = 1
                        self._emit(data[out : i - 1])
                        self.size -= 1
                        self._emit(b".")
                        out = i - 1
                        state = S_MID
                        if line > max_line:
                            self.line_too_long = True
                        continue
                    line = 0  # a transparency dot (4.5.2) is not part of the line
                    dot_at = i - 1  # held back until we know what it is
                    state = S_DOT
                    continue
                line = 0
                state = S_MID
                if c == CR or c == LF:
                    line = 1
                    i += 1
                    if c == CR:
                        state = S_CR
                        continue
                    if not self.normalize:
                        raise _fatal(ERR_BARE_LF)
                    self._emit(data[out : i - 1])
                    self._emit(b"\r\n")
                    out = i
                    state = S_BOL
                    line = 0
                    lf = True
                continue
            if state == S_CR:
                if c != LF:
                    raise _fatal(ERR_BARE_CR)
                line += 1
                i += 1
                if line > max_line:
                    self.line_too_long = True
                state = S_BOL
                line = 0
                lf = False
                continue
            if state == S_DOT:
                if c == CR:
                    state = S_DOTCR
                    line += 1
                    i += 1
                    continue
                if c == LF:
                    # ".\n": never the end of data (smuggling); a content line "."
                    if not self.normalize:
                        raise _fatal(ERR_BARE_LF)
                    if dot_at >= 0:
                        self._emit(data[out:dot_at])
                    i += 1
                    if mode != MODE_UNSTUFF:
                        self.size -= 1  # the stuffed dot of "..\r\n"
                    self._emit(b".\r\n" if mode == MODE_UNSTUFF else b"..\r\n")
                    out = i
                    state = S_BOL
                    line = 0
                    lf = True
                    continue
                # a stuffed dot: drop it (MODE_UNSTUFF) or keep it (MODE_WIRE)
                if mode == MODE_UNSTUFF:
                    if dot_at >= 0:
                        self._emit(data[out:dot_at])
                    out = i
                else:
                    self.size -= 1  # kept in wire form, but not part of the message
                    if dot_at < 0:  # the dot ended the previous chunk
                        self._emit(b".")
                state = S_MID
                continue
            # state == S_DOTCR
            if c != LF:
                raise _fatal(ERR_BARE_CR)
            if dot_at >= 0:
                self._emit(data[out:dot_at])
            i += 1
            if lf:
                # "\n.\r\n": the line before ended in a bare LF, so this is not
                # CRLF.CRLF (smuggling); it is a content line "."
                if mode != MODE_UNSTUFF:
                    self.size -= 1
                self._emit(b".\r\n" if mode == MODE_UNSTUFF else b"..\r\n")
                out = i
                state = S_BOL
                line = 0
                lf = False
                continue
            self._state = S_BOL
            self._line = 0
            self.done = True
            return i
        if state != S_DOT and state != S_DOTCR:
            self._emit(data[out:n])
        elif dot_at >= 0:
            self._emit(data[out:dot_at])
        self._state = state
        self._line = line
        self._lf = lf
        return n

    def finish(self) -> None:
        """BDAT LAST: the content is complete. A last line without CRLF gets one (the
        stored message is always whole lines); a dangling CR is a bare CR."""
        if self.mode != MODE_BDAT or self.done:
            return
        if self._state == S_CR:
            raise _fatal(ERR_BARE_CR)
        if self._state == S_MID:
            self._emit(b"\r\n")
        self._state = S_BOL
        self.done = True


def dot_stuff(body: bytes, terminate: bool = True) -> bytes:
    """Turn a message from an API caller into wire form: every line ending (CRLF, bare LF
    or bare CR) becomes CRLF, a line starting with "." gets another (4.5.2), the last line
    is ended, and with ``terminate`` the end marker ".\\r\\n" follows."""
    body = _bytes(body)
    if b"\r" in body:
        body = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    if body and not body.endswith(b"\n"):
        body += b"\n"
    body = body.replace(b"\n.", b"\n..")
    if body.startswith(b"."):
        body = b"." + body
    body = body.replace(b"\n", b"\r\n")
    return body + b".\r\n" if terminate else body


# --------------------------------------------------------------------------------------
# Replies (client side)
# --------------------------------------------------------------------------------------

ERR_REPLY = (451, "4.5.0", "Malformed reply from server")


class ReplyReader:
    """Replies from a server (RFC 5321 4.2), single and multi-line, incremental.

    Liberal in what it accepts (a bare LF ends a line too), bounded in what it keeps: a line
    over ``max_line`` octets or a reply over ``max_lines`` lines is an error."""

    def __init__(self, max_line: int = 2048, max_lines: int = 128) -> None:
        self.max_line = max_line
        self.max_lines = max_lines
        self._buf = bytearray()
        self._pos = 0
        self._scan = 0
        self._code = 0
        self._lines: list[bytes] = []

    def feed(self, data: bytes) -> None:
        if self._pos:  # drop consumed lines: bounded even when every feed ends mid-line
            del self._buf[: self._pos]
            self._scan -= self._pos
            self._pos = 0
        self._buf += data

    def next_reply(self) -> Reply | None:
        """The next complete reply, or None until one has arrived. Raises ParseError."""
        buf = self._buf
        while True:
            start = self._pos
            lf = buf.find(b"\n", max(self._scan, start))
            if lf < 0:
                if len(buf) - start > self.max_line:
                    raise _err(ERR_REPLY, "line too long")
                self._scan = len(buf)
                return None
            self._pos = self._scan = lf + 1
            end = lf - 1 if lf > start and buf[lf - 1] == CR else lf
            if lf + 1 - start > self.max_line:
                raise _err(ERR_REPLY, "line too long")
            line = bytes(buf[start:end])
            if (
                len(line) < 3
                or not (50 <= line[0] <= 53)
                or not (48 <= line[1] <= 53)
                or not (48 <= line[2] <= 57)
                or (len(line) > 3 and line[3] != 32 and line[3] != 45)
            ):
                raise _err(ERR_REPLY, "bad reply line")
            code = (line[0] - 48) * 100 + (line[1] - 48) * 10 + line[2] - 48
            if self._lines and code != self._code:
                raise _err(ERR_REPLY, "code changed within a reply")
            self._code = code
            self._lines.append(line)
            if len(self._lines) > self.max_lines:
                raise _err(ERR_REPLY, "too many lines")
            if len(line) > 3 and line[3] == 45:  # "-": more lines follow
                continue
            lines = self._lines
            self._lines = []
            return _make_reply(code, lines)


def _enhanced(code: int, text: bytes) -> int:
    """Length of an RFC 3463 status code ``class.subject.detail`` at the start of text whose
    class matches the reply code (and the space after it), else 0."""
    n = len(text)
    if n < 5 or text[0] != 48 + code // 100 or text[1] != DOT:
        return 0
    i = 2
    for _ in range(2):
        k = i
        while i < n and 48 <= text[i] <= 57 and i - k < 3:
            i += 1
        if i == k:
            return 0
        if _ == 0:
            if i >= n or text[i] != DOT:
                return 0
            i += 1
    if i < n and text[i] != 32:
        return 0
    return i


# RFC 5321 4.2: reply text is HT and printable characters; the other C0 controls and DEL
# become "?" (remote text reaches logs, DSNs and terminals)
_CONTROLS = {c: "?" for c in (*range(9), *range(10, 32), 127)}


def _make_reply(code: int, lines: list[bytes]) -> Reply:
    enhanced = None
    texts = []
    for k, line in enumerate(lines):
        text = line[4:]
        e = _enhanced(code, text)
        if e:
            if k == 0:
                enhanced = text[:e].decode("ascii")
            text = text[e + 1 :]
        texts.append(text.decode("utf-8", "replace").translate(_CONTROLS))
    return Reply(code, enhanced, tuple(texts))
