"""Header fields fastmta adds to messages it accepts: the Received trace field
(RFC 5321 4.4), and on submission the Message-ID and Date a client left out (RFC 6409 8);
and the one it reads: the count of Received fields, against mail loops (RFC 5321 6.3).

Input and output are wire form (CRLF, dot-stuffed): header lines never start with ".", so
adding fields in front of or inside the header block needs no stuffing.
"""

from __future__ import annotations

import email.utils
import os
import re
import time

_date_cache: tuple[int, str] = (0, "")


def rfc5322_date(now: float | None = None) -> str:
    """``Sun, 29 Nov 2026 15:20:13 +0000`` for now (cached per second: it is on the hot path)."""
    global _date_cache
    t = int(time.time() if now is None else now)
    if _date_cache[0] != t:
        _date_cache = (t, email.utils.formatdate(t, localtime=True))
    return _date_cache[1]


def protocol_name(esmtp: bool, tls: bool, authenticated: bool) -> str:
    """The ``with`` clause of RFC 3848: SMTP, ESMTP, ESMTPS, ESMTPA, ESMTPSA."""
    if not esmtp:
        return "SMTP"
    return "ESMTP" + ("S" if tls else "") + ("A" if authenticated else "")


def received(
    *,
    helo: str | None,
    client_ip: str,
    hostname: str,
    protocol: str,
    queue_id: str,
    recipient: str | None,
    now: float | None = None,
) -> bytes:
    """A Received field (RFC 5321 4.4 Time-stamp-line), folded like Postfix's."""
    ip = f"IPv6:{client_ip}" if ":" in client_ip else client_ip
    helo_part = _clean(helo) if helo else "unknown"
    lines = [
        f"Received: from {helo_part} ([{ip}])",
        f"\tby {hostname} (fastmta) with {protocol} id {queue_id}",
    ]
    if recipient is not None:  # only for a single recipient: do not disclose the others
        lines.append(f"\tfor <{_clean(recipient)}>; {rfc5322_date(now)}")
    else:
        lines[-1] += ";"
        lines.append(f"\t{rfc5322_date(now)}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "replace")


def _clean(text: str) -> str:
    """No control characters from the client inside our header (header injection)."""
    return "".join(c if c >= " " and c != "\x7f" else "?" for c in text)[:255]


def header_block_end(chunks: list[bytes], limit: int = 64 << 10) -> tuple[bytes, bool]:
    """The header block of a message (up to the blank line) as bytes, looking at no more
    than ``limit`` octets; and whether the end of the block was found."""
    if chunks and not chunks[0].startswith(b"\r\n"):  # the usual case: no copy
        end = chunks[0].find(b"\r\n\r\n", 0, limit)
        if end >= 0:
            return chunks[0][: end + 2], True
    head = b""
    for c in chunks:
        head += c[: limit - len(head)]
        if b"\r\n\r\n" in head or len(head) >= limit:
            break
    if head.startswith(b"\r\n"):
        return b"", True
    end = head.find(b"\r\n\r\n")
    if end < 0:
        return head, False
    return head[: end + 2], True


_RECEIVED = re.compile(rb"(?:^|\n)received[ \t]*:", re.IGNORECASE)


_MESSAGE_ID = re.compile(rb"(?:^|\n)message-id[ \t]*:[ \t]*((?:[^\r\n]|\r\n[ \t])*)", re.I)


def message_id(head: bytes) -> str | None:
    """The Message-ID: field's value of a header block (unfolded, at most 256 characters), or
    None when there is none."""
    m = _MESSAGE_ID.search(head)
    if m is None:
        return None
    value = b" ".join(m.group(1).split()).decode("utf-8", "replace")
    if not value.isprintable():  # no control characters into logs and terminals
        value = "".join(c for c in value if c.isprintable())
    return value[:256] or None


def hop_count(head: bytes) -> int:
    """How many Received: fields a header block has: the hops the message made so far."""
    return len(_RECEIVED.findall(head))


def has_field(head: bytes, name: bytes) -> bool:
    """Is a header field called ``name`` (lower-case, with the colon) in this block?"""
    lower = head.lower()
    return lower.startswith(name) or (b"\r\n" + name) in lower


def submission_fields(head: bytes, hostname: str, queue_id: str) -> bytes:
    """Message-ID and Date a submission client left out (RFC 6409 8.2, 8.3) of the header
    block ``head``, as header lines to add to the top of the message (empty if both are
    present)."""
    out = b""
    if not has_field(head, b"message-id:"):
        out += f"Message-ID: <{queue_id}.{os.getpid()}@{hostname}>\r\n".encode()
    if not has_field(head, b"date:"):
        out += f"Date: {rfc5322_date()}\r\n".encode()
    return out
