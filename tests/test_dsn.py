"""RFC 3464 DSNs: structure as parsed by the email package, wire form, RET, odd originals."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage

import pytest

from fastmta.delivery.dsn import FailedRecipient, build_dsn, should_bounce

ARRIVAL = 1_700_000_000.0  # Tue, 14 Nov 2023 22:13:20 +0000
ORIGINAL = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: bob@example.com\r\n"
    b"Subject: quarterly report\r\n"
    b"Message-ID: <orig-1@example.org>\r\n"
    b"\r\n"
    b"..this line starts with a dot\r\n"
    b"secret body text\r\n"
)


def unstuff(wire: bytes) -> bytes:
    if wire.startswith(b".."):
        wire = wire[1:]
    return wire.replace(b"\r\n..", b"\r\n.")


def parse(wire: bytes) -> EmailMessage:
    msg = email.message_from_bytes(unstuff(wire), policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def rcpt(**kw) -> FailedRecipient:
    base = dict(
        address="bob@example.com",
        orcpt=None,
        action="failed",
        status="5.1.1",
        diagnostic="smtp; 550 5.1.1 no such user",
        remote_mta="mx.example.com",
        last_attempt=ARRIVAL + 60,
    )
    base.update(kw)
    return FailedRecipient(**base)


def dsn(**kw) -> bytes:
    args = dict(
        reporting_mta="mta.example.org",
        envelope_id=None,
        original_sender="alice@example.org",
        arrival=ARRIVAL,
        recipients=[rcpt()],
        original=ORIGINAL,
        ret=None,
        now=ARRIVAL + 120,
    )
    args.update(kw)
    return build_dsn(**args)


def test_failure_dsn_structure_and_fields():
    wire = dsn(
        envelope_id="env+2B1", queue_id="Q42", recipients=[rcpt(orcpt="rfc822;Bob+2Bx@e.com")]
    )
    msg = parse(wire)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert str(msg["From"]) == "Mail Delivery System <MAILER-DAEMON@mta.example.org>"
    assert msg["To"] == "alice@example.org"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["MIME-Version"] == "1.0"
    assert msg["Message-ID"].startswith("<") and msg["Message-ID"].endswith("@mta.example.org>")
    assert msg["Date"].datetime.timestamp() == ARRIVAL + 120
    assert not msg.defects

    text, status, returned = msg.iter_parts()
    assert text.get_content_type() == "text/plain"
    body = text.get_content()
    assert "This is the mail system at host mta.example.org." in body
    assert "<bob@example.com>: host mx.example.com said: 550 5.1.1 no such user" in body

    assert status.get_content_type() == "message/delivery-status"
    per_message, per_rcpt = status.get_payload()
    assert per_message["Reporting-MTA"] == "dns; mta.example.org"
    assert per_message["X-Queue-ID"] == "Q42"
    assert per_message["Original-Envelope-Id"] == "env+1"  # xtext decoded
    assert per_message["Arrival-Date"] == "Tue, 14 Nov 2023 22:13:20 +0000"
    assert per_rcpt["Final-Recipient"] == "rfc822; bob@example.com"
    assert per_rcpt["Original-Recipient"] == "rfc822; Bob+x@e.com"
    assert per_rcpt["Action"] == "failed"
    assert per_rcpt["Status"] == "5.1.1"
    assert per_rcpt["Remote-MTA"] == "dns; mx.example.com"
    assert per_rcpt["Diagnostic-Code"] == "smtp; 550 5.1.1 no such user"
    assert per_rcpt["Last-Attempt-Date"] == "Tue, 14 Nov 2023 22:14:20 +0000"
    assert "Will-Retry-Until" not in per_rcpt

    # Default RET: headers only, never the body.
    assert returned.get_content_type() == "text/rfc822-headers"
    headers = returned.get_payload(decode=True)
    assert b"Subject: quarterly report" in headers
    assert b"secret body" not in wire


def test_wire_form_crlf_stuffed_no_final_dot():
    wire = dsn(ret="FULL")
    assert b"\n" not in wire.replace(b"\r\n", b"")  # CRLF only
    assert b"\r" not in wire.replace(b"\r\n", b"")
    assert wire.endswith(b"--\r\n") and not wire.endswith(b"\r\n.\r\n")
    lines = wire.split(b"\r\n")
    assert all(not ln.startswith(b".") or ln.startswith(b"..") for ln in lines)
    assert b"\r\n..this line starts with a dot\r\n" in wire  # the original's dot, stuffed again
    assert all(len(ln) <= 998 for ln in lines)  # RFC 5322 section 2.1.1


def test_ret_full_returns_whole_original_unstuffed():
    msg = parse(dsn(ret="full"))
    returned = list(msg.iter_parts())[2]
    assert returned.get_content_type() == "message/rfc822"
    inner = returned.get_payload()[0]
    assert inner["Subject"] == "quarterly report"
    body = inner.get_content().replace("\r\n", "\n")
    assert body == ".this line starts with a dot\nsecret body text\n"


def test_ret_full_too_large_falls_back_to_headers():
    big = ORIGINAL + b"x" * 998 + b"\r\n"
    wire = dsn(ret="FULL", original=big, max_original=len(big) - 10)
    returned = list(parse(wire).iter_parts())[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    assert b"xxxx" not in wire
    # Even the headers are capped, at a line boundary.
    wire = dsn(ret="HDRS", max_original=60)
    returned = list(parse(wire).iter_parts())[2].get_payload(decode=True)
    assert b"From: Alice" in returned and b"Subject" not in returned


def test_delay_dsn():
    wire = dsn(
        kind="delay",
        recipients=[rcpt(action="delayed", status="4.4.1", diagnostic="connection timed out")],
        now=ARRIVAL + 4 * 3600,
        retry_until=ARRIVAL + 5 * 86400,
    )
    msg = parse(wire)
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    text, status, _ = msg.iter_parts()
    assert "THIS IS A WARNING ONLY" in text.get_content()
    assert "for 4.0 hours" in text.get_content()
    per_rcpt = status.get_payload()[1]
    assert per_rcpt["Action"] == "delayed"
    assert per_rcpt["Status"] == "4.4.1"
    assert per_rcpt["Diagnostic-Code"] == "smtp; connection timed out"  # type added
    assert per_rcpt["Will-Retry-Until"] == "Sun, 19 Nov 2023 22:13:20 +0000"


def test_several_recipients_each_get_a_block():
    rs = [rcpt(address=f"u{i}@example.com", remote_mta=None, last_attempt=None) for i in range(3)]
    status = list(parse(dsn(recipients=rs)).iter_parts())[1]
    blocks = status.get_payload()
    assert len(blocks) == 4
    assert [b["Final-Recipient"] for b in blocks[1:]] == [
        f"rfc822; u{i}@example.com" for i in range(3)
    ]
    assert all("Remote-MTA" not in b and "Last-Attempt-Date" not in b for b in blocks[1:])


def test_8bit_utf8_and_malformed_original_headers_do_not_crash():
    original = (
        "From: Jörg <jörg@exämple.de>\r\n".encode()
        + b"Subject: \xff\xfe raw latin-1 \xe9\r\n"
        + b"X-Broken header without colon\r\n"
        + b"\r\n"
        + "Grüße\r\n".encode()
    )
    for ret in (None, "FULL"):
        wire = dsn(
            original=original,
            ret=ret,
            original_sender="jörg@exämple.de",
            recipients=[rcpt(address="müller@example.com", diagnostic="smtp; 550 unbekannt")],
        )
        assert b"Content-Transfer-Encoding: 8bit" in wire
        msg = parse(wire)
        assert msg.get_content_type() == "multipart/report"
        parts = list(msg.iter_parts())
        assert len(parts) == 3
        per_rcpt = parts[1].get_payload()[1]
        assert per_rcpt["Final-Recipient"] == "utf-8; müller@example.com"  # RFC 6533
        assert b"\xff\xfe raw latin-1" in wire  # copied untouched


def test_remote_text_cannot_inject_header_fields():
    evil = "smtp; 550 no\r\nX-Injected: yes\r\n\r\nbody"
    wire = dsn(recipients=[rcpt(diagnostic=evil, remote_mta="mx\r\nX-Other: 1")])
    status = list(parse(wire).iter_parts())[1]
    per_rcpt = status.get_payload()[1]
    assert "X-Injected" not in per_rcpt and "X-Other" not in per_rcpt
    assert per_rcpt["Diagnostic-Code"] == "smtp; 550 no X-Injected: yes body"


def test_long_diagnostic_is_folded_and_capped():
    long = "smtp; 550 " + " ".join(["word"] * 400)
    wire = dsn(recipients=[rcpt(diagnostic=long)])
    assert all(len(ln) <= 998 for ln in wire.split(b"\r\n"))
    per_rcpt = list(parse(wire).iter_parts())[1].get_payload()[1]
    assert per_rcpt["Diagnostic-Code"].startswith("smtp; 550 word word")
    assert per_rcpt["Diagnostic-Code"].endswith("...")


def test_original_starting_with_dot_and_empty_original():
    msg = parse(dsn(original=b"..X: y\r\n\r\nz\r\n", ret="FULL"))
    assert list(msg.iter_parts())[2].get_payload()[0][".X"] == "y"
    wire = dsn(original=b"", ret="FULL")
    assert parse(wire).get_content_type() == "multipart/report"


def test_arguments_are_validated():
    with pytest.raises(ValueError):
        dsn(recipients=[])
    with pytest.raises(ValueError):
        dsn(kind="bogus")


def test_should_bounce():
    assert should_bounce("alice@example.org", is_bounce=False)
    assert not should_bounce("", is_bounce=False)
    assert not should_bounce("<>", is_bounce=False)
    assert not should_bounce("alice@example.org", is_bounce=True)
