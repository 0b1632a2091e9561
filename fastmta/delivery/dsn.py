"""Delivery status notifications (bounces, delay warnings and success reports), RFC 3464 in
RFC 6522 reports.

:func:`build_dsn` returns a complete message in wire form (CRLF line endings, dot-stuffed,
without the final ".\\r\\n"), ready to be queued from the null sender (RFC 5321 section
4.5.5) to the original sender. :func:`should_bounce` says whether one may be sent at all.

The message is assembled as bytes, not through ``email.generator``: the original message may
carry 8-bit or malformed headers, and they are copied untouched (8bit transfer encoding).
"""

from __future__ import annotations

import re
import secrets
import textwrap
import time
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Literal

import msgspec

__all__ = ["FailedRecipient", "build_dsn", "should_bounce", "MAX_ORIGINAL"]

#: Largest original included whole with RET=FULL; beyond it only the headers are returned.
MAX_ORIGINAL = 1024 * 1024
#: Diagnostic text kept per recipient, so every line stays under the 998 octets of
#: RFC 5322 section 2.1.1 (remote replies can be long multi-line texts).
MAX_DIAGNOSTIC = 900

_XTEXT = re.compile(r"\+([0-9A-Fa-f]{2})")
_WS = re.compile(r"[\r\n\t ]+")
_TYPED = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*\s*;")
_HOSTNAME = re.compile(r"^[A-Za-z0-9.-]{1,40}$")


class FailedRecipient(msgspec.Struct):
    """One recipient reported in a DSN; ``action`` is RFC 3464 section 2.3.3's.

    ``status`` is an RFC 3463 enhanced code ("5.1.1"); ``diagnostic`` is the RFC 3464
    section 2.3.6 diagnostic code ("smtp; 550 5.1.1 no such user"; a bare text gets "smtp; ");
    ``orcpt`` is the ORCPT parameter as received ("rfc822;bob+2Bx@example.com", xtext, RFC 3461
    section 4.2); ``remote_mta`` is a host name; ``last_attempt`` a Unix time.
    """

    address: str
    orcpt: str | None = None
    action: Literal["failed", "delayed", "delivered", "relayed"] = "failed"
    status: str = "5.0.0"
    diagnostic: str | None = None
    remote_mta: str | None = None
    last_attempt: float | None = None


def should_bounce(sender: str, is_bounce: bool) -> bool:
    """True when a DSN may be sent to ``sender``.

    Never for the null sender and never for a message that is itself a bounce
    (RFC 5321 section 4.5.5, RFC 3464 section 5.3): that is how bounce loops are avoided.
    """
    return not is_bounce and sender.strip() not in ("", "<>")


def _one_line(value: str, limit: int = MAX_DIAGNOSTIC) -> str:
    """Collapse line breaks and runs of white space (no header injection); cap the length."""
    value = _WS.sub(" ", value).strip()
    if len(value) > limit:
        value = value[: limit - 3] + "..."
    return value


def _xtext_decode(value: str) -> str:
    """Decode RFC 3461 section 4 xtext ("+2B" -> "+"); other text is left as it is."""
    return _XTEXT.sub(lambda m: chr(int(m.group(1), 16)), value)


def _date(ts: float) -> str:
    """RFC 5322 section 3.3 date-time in UTC: "Tue, 02 Jan 2024 03:04:05 +0000"."""
    return format_datetime(datetime.fromtimestamp(ts, UTC))


def _addr_type(address: str) -> str:
    # RFC 6533 section 3: "utf-8" address type for internationalised addresses.
    return "rfc822" if address.isascii() else "utf-8"


def _field(name: str, value: str) -> str:
    """One header-style field, folded at white space near 78 columns (RFC 5322 section 2.2.3)."""
    lines = textwrap.wrap(
        value,
        width=76,
        initial_indent=f"{name}: ",
        subsequent_indent=" ",
        break_long_words=False,
        break_on_hyphens=False,
    )
    return "\r\n".join(lines) if lines else f"{name}:"


def _split_original(original: bytes) -> tuple[bytes, bytes]:
    """Un-dot-stuff the wire-form original; return (header section with final CRLF, whole)."""
    if original.startswith(b".."):
        original = original[1:]
    original = original.replace(b"\r\n..", b"\r\n.")
    if original and not original.endswith(b"\r\n"):
        original += b"\r\n"
    if original.startswith(b"\r\n"):  # no header section at all
        return b"", original
    end = original.find(b"\r\n\r\n")
    headers = original if end < 0 else original[: end + 2]
    return headers, original


def _cap_headers(headers: bytes, limit: int) -> bytes:
    if len(headers) <= limit:
        return headers
    cut = headers.rfind(b"\r\n", 0, limit)
    return headers[: cut + 2] if cut >= 0 else b""


def _cte(data: bytes) -> bytes:
    return b"7bit" if data.isascii() else b"8bit"


def _human_text(
    reporting_mta: str,
    recipients: list[FailedRecipient],
    kind: str,
    arrival: float,
    now: float,
    retry_until: float | None,
) -> str:
    lines = [f"This is the mail system at host {reporting_mta}.", ""]
    if kind == "success":  # (Postfix's words)
        lines += [
            "Your message was successfully delivered to the destination(s)",
            "listed below. If the message was delivered to mailbox you will",
            "receive no further notifications. Otherwise you may still receive",
            "notifications of mail delivery errors from other systems.",
        ]
    elif kind == "delay":
        hours = max(0.0, (now - arrival) / 3600)
        lines += [
            "####################################################################",
            "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #",
            "####################################################################",
            "",
            f"Your message could not be delivered for {hours:.1f} hours.",
        ]
        if retry_until is not None:
            days = max(0.0, (retry_until - arrival) / 86400)
            lines.append(f"It will be retried until it is {days:.1f} days old.")
    else:
        lines += [
            "I'm sorry to have to inform you that your message could not",
            "be delivered to one or more recipients. It's attached below.",
            "",
            "For further assistance, please send mail to postmaster.",
            "",
            "If you do so, please include this problem report. You can",
            "delete your own text from the attached returned message.",
        ]
    lines += ["", "                   The mail system", ""]
    for r in recipients:
        diag = r.diagnostic or ""
        if _TYPED.match(diag):
            diag = diag.split(";", 1)[1]
        diag = _one_line(diag)
        if not diag:
            diag = _NO_DIAGNOSTIC[r.action]
        addr = _one_line(r.address, 512)
        if r.remote_mta:
            lines.append(f"<{addr}>: host {_one_line(r.remote_mta, 255)} said: {diag}")
        else:
            lines.append(f"<{addr}>: {diag}")
        lines.append("")
    return "\r\n".join(lines)


_NO_DIAGNOSTIC = {
    "failed": "delivery failed",
    "delayed": "delivery temporarily suspended",
    "delivered": "delivered to mailbox",
    "relayed": "relayed to a host without DSN support",
}


def _status_part(
    reporting_mta: str,
    envelope_id: str | None,
    queue_id: str | None,
    arrival: float,
    recipients: list[FailedRecipient],
    retry_until: float | None,
) -> str:
    # RFC 3464 section 2.2: per-message fields, then one block per recipient (section 2.3),
    # each block preceded by a blank line.
    out = [_field("Reporting-MTA", f"dns; {_one_line(reporting_mta, 255)}")]
    if queue_id:
        out.append(_field("X-Queue-ID", _one_line(queue_id, 255)))
    if envelope_id:
        out.append(_field("Original-Envelope-Id", _one_line(_xtext_decode(envelope_id), 255)))
    out.append(_field("Arrival-Date", _date(arrival)))
    for r in recipients:
        addr = _one_line(r.address, 512)
        out.append("")
        out.append(_field("Final-Recipient", f"{_addr_type(addr)}; {addr}"))
        if r.orcpt:
            orcpt = _one_line(_xtext_decode(r.orcpt), 512)
            if ";" in orcpt:
                atype, _, value = orcpt.partition(";")
                orcpt = f"{atype.strip()}; {value.strip()}"
            else:
                orcpt = f"{_addr_type(orcpt)}; {orcpt}"
            out.append(_field("Original-Recipient", orcpt))
        out.append(_field("Action", r.action))
        out.append(_field("Status", _one_line(r.status, 32)))
        if r.remote_mta:
            mta = _one_line(r.remote_mta, 255)
            out.append(_field("Remote-MTA", mta if _TYPED.match(mta) else f"dns; {mta}"))
        if r.diagnostic:
            diag = _one_line(r.diagnostic)
            out.append(_field("Diagnostic-Code", diag if _TYPED.match(diag) else f"smtp; {diag}"))
        if r.last_attempt is not None:
            out.append(_field("Last-Attempt-Date", _date(r.last_attempt)))
        if r.action == "delayed" and retry_until is not None:
            out.append(_field("Will-Retry-Until", _date(retry_until)))
    return "\r\n".join(out) + "\r\n"


def build_dsn(
    *,
    reporting_mta: str,
    envelope_id: str | None,
    original_sender: str,
    arrival: float,
    recipients: list[FailedRecipient],
    original: bytes,
    ret: str | None,
    kind: Literal["failure", "delay", "success"] = "failure",
    queue_id: str | None = None,
    retry_until: float | None = None,
    max_original: int = MAX_ORIGINAL,
    now: float | None = None,
) -> bytes:
    """Build an RFC 3464 DSN; return it in wire form (CRLF, dot-stuffed, no final dot).

    ``original`` is the original message in wire form. ``ret`` is the RET parameter of the
    original MAIL command (RFC 3461 section 4.3): "FULL" returns the whole original as
    message/rfc822 when it is at most ``max_original`` bytes; otherwise (``"HDRS"``, None, or
    too large) only its header section is returned as text/rfc822-headers (RFC 6522 section
    4), itself capped at ``max_original`` at a line boundary. A success report
    (``kind="success"``: recipients "delivered" or "relayed") always returns the headers only:
    RET=FULL asks for the content in "failed" DSNs (RFC 3461 section 4.3). ``envelope_id``
    and recipient ``orcpt`` values are taken as received (xtext) and decoded. ``retry_until`` adds
    Will-Retry-Until to delayed recipients. ``now`` (default: the clock) sets the Date.
    Field values are made single-line, so remote text cannot inject header fields.
    """
    if kind not in ("failure", "delay", "success"):
        raise ValueError(f"kind must be 'failure', 'delay' or 'success', not {kind!r}")
    if not recipients:
        raise ValueError("a DSN needs at least one recipient")
    now = time.time() if now is None else now
    mta = _one_line(reporting_mta, 255)
    to = _one_line(original_sender, 512).strip("<>")

    headers, whole = _split_original(original)
    full = (ret or "").upper() == "FULL" and len(whole) <= max_original and kind != "success"
    if full:
        returned = whole
        ctype3, desc3 = "message/rfc822", "Undelivered Message"
    else:
        returned = _cap_headers(headers, max_original)
        ctype3, desc3 = "text/rfc822-headers", "Undelivered Message Headers"
    if kind != "failure":
        desc3 = desc3.replace("Undelivered", "Delayed" if kind == "delay" else "Delivered")

    text = _human_text(mta, recipients, kind, arrival, now, retry_until).encode("utf-8")
    status = _status_part(mta, envelope_id, queue_id, arrival, recipients, retry_until)
    status_b = status.encode("utf-8")

    # RFC 2046 section 5.1.1: boundary characters, at most 70; the host only if plain and short.
    suffix = mta if _HOSTNAME.match(mta) else "fastmta"
    boundary = f"{secrets.token_hex(8)}.{int(now)}/{suffix}"
    while boundary.encode() in returned:  # pragma: no cover - 64 random bits
        boundary = f"{secrets.token_hex(8)}.{int(now)}/{suffix}"
    dash = b"--" + boundary.encode()
    eight_bit = not (text.isascii() and status_b.isascii() and returned.isascii())
    eight_bit = eight_bit or not (mta.isascii() and to.isascii())

    subject = {  # (Postfix's subjects)
        "failure": "Undelivered Mail Returned to Sender",
        "delay": "Delayed Mail (still being retried)",
        "success": "Successful Mail Delivery Report",
    }[kind]
    top = "\r\n".join(
        [
            f"From: Mail Delivery System <MAILER-DAEMON@{mta}>",
            f"To: {to}",
            f"Subject: {subject}",
            f"Date: {_date(now)}",
            f"Message-ID: <{int(now)}.{secrets.token_hex(8)}@{mta}>",
            "MIME-Version: 1.0",
            "Auto-Submitted: auto-replied",  # RFC 3834 section 5
            "Content-Type: multipart/report; report-type=delivery-status;",
            f'\tboundary="{boundary}"',
            f"Content-Transfer-Encoding: {'8bit' if eight_bit else '7bit'}",
            "",
            "This is a MIME-encapsulated message.",
            "",
        ]
    ).encode("utf-8")
    charset = b"us-ascii" if text.isascii() else b"utf-8"
    parts = [
        top,
        dash,
        b"Content-Description: Notification",
        b"Content-Type: text/plain; charset=" + charset,
        b"Content-Transfer-Encoding: " + _cte(text),
        b"",
        text,
        dash,
        b"Content-Description: Delivery report",
        b"Content-Type: message/delivery-status",
        b"Content-Transfer-Encoding: " + _cte(status_b),
        b"",
        status_b,
        dash,
        b"Content-Description: " + desc3.encode(),
        b"Content-Type: " + ctype3.encode(),
        b"Content-Transfer-Encoding: " + _cte(returned),
        b"",
        returned,
        dash + b"--",
        b"",
    ]
    msg = b"\r\n".join(parts)
    # Dot-stuff the whole message once (RFC 5321 section 4.5.2).
    if msg.startswith(b"."):
        msg = b"." + msg
    return msg.replace(b"\r\n.", b"\r\n..")
