"""Parser micro benchmarks: the compiled module ("c") against its pure-Python twin ("py").

    python -m pytest benchmarks/bench_parse.py --benchmark-enable -q
    python -m pytest benchmarks/bench_parse.py --smoke -q      # each once: does it work?

The closing summary prints lines/s, MB/s and replies/s per case and the c/py ratio.
Inputs are built once, outside the timed calls.
"""

from __future__ import annotations

import pytest

CHUNK = 64 * 1024  # what a socket read hands the session

# --------------------------------------------------------------------------------------
# Command lines: LineReader + parse_command + parse_mail / parse_rcpt
# --------------------------------------------------------------------------------------


def _pipelined(n: int = 1000) -> bytes:
    """n pipelined command lines, as a bulk sender writes them (RFC 2920): per transaction
    one MAIL with parameters, eight RCPTs, DATA, and a RSET now and then."""
    lines: list[bytes] = []
    k = 0
    while len(lines) < n:
        lines.append(
            b"MAIL FROM:<bounces+%d@mailer.example.com> SIZE=%d BODY=8BITMIME" % (k, 9000 + k)
        )
        for r in range(8):
            lines.append(b"RCPT TO:<customer.%d.%d@example-%d.org>" % (k, r, r))
        lines.append(b"DATA" if k % 4 else b"RSET")
        k += 1
    return b"".join(line + b"\r\n" for line in lines[:n])


PIPELINED = _pipelined()
N_LINES = PIPELINED.count(b"\n")


def _commands(mod, buf: bytes) -> int:
    reader = mod.LineReader()
    parse_command, parse_mail, parse_rcpt = mod.parse_command, mod.parse_mail, mod.parse_rcpt
    readline = reader.readline
    n = 0
    for start in range(0, len(buf), CHUNK):
        reader.feed(buf[start : start + CHUNK])
        while (line := readline()) is not None:
            verb, arg = parse_command(line)
            if verb == "RCPT":
                parse_rcpt(arg)
            elif verb == "MAIL":
                parse_mail(arg)
            n += 1
    return n


def test_command_lines(impl, measure):
    assert measure("commands", N_LINES, "lines", _commands, impl, PIPELINED) == N_LINES


# --------------------------------------------------------------------------------------
# DATA content: MODE_WIRE and MODE_UNSTUFF, fed in 64 KiB chunks
# --------------------------------------------------------------------------------------

_B64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _message(size: int) -> bytes:
    """Headers, then 76-character base64-ish lines (RFC 2045 6.8), a few lines starting
    with "." (stuffed, as on the wire), then the end marker."""
    head = (
        b"Received: from client.example (client.example [192.0.2.1])\r\n"
        b"\tby mx.example with ESMTP id 4Xy2kq1Zz9; Fri, 1 Mar 2024 10:00:00 +0000\r\n"
        b"From: Sender <sender@example.com>\r\nTo: <rcpt@example.org>\r\n"
        b"Subject: benchmark\r\nMessage-ID: <1234.5678@example.com>\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    )
    parts = [head]
    total = len(head)
    k = 0
    while total < size:
        if k % 97 == 50:
            line = b".." + _B64[k % 64 :][:40] + b"\r\n"  # a content line starting with "."
        else:
            line = (_B64[k % 64 :] + _B64)[:76] + b"\r\n"
        parts.append(line)
        total += len(line)
        k += 1
    return b"".join(parts) + b".\r\n"


SIZES = {"1KiB": 1024, "100KiB": 100 * 1024, "10MiB": 10 * 1024 * 1024}
MESSAGES = {name: _message(size) for name, size in SIZES.items()}
CHUNKS = {
    name: [msg[i : i + CHUNK] for i in range(0, len(msg), CHUNK)] for name, msg in MESSAGES.items()
}


def _data(mod, mode: int, chunks: list[bytes]) -> int:
    reader = mod.DataReader(1 << 40, mode=mode)
    feed, take = reader.feed, reader.take
    kept = 0
    for chunk in chunks:
        feed(chunk)
        for piece in take():
            kept += len(piece)
    assert reader.done
    return kept


@pytest.mark.parametrize("mode", ["wire", "unstuff"])
@pytest.mark.parametrize("size", list(SIZES))
def test_data(impl, measure, size, mode):
    m = impl.MODE_WIRE if mode == "wire" else impl.MODE_UNSTUFF
    msg = MESSAGES[size]
    kept = measure(f"data {mode} {size}", len(msg), "bytes", _data, impl, m, CHUNKS[size])
    assert kept == len(msg) - 3 - (msg.count(b"\n..") if mode == "unstuff" else 0)


# --------------------------------------------------------------------------------------
# Replies: a multi-line EHLO reply and the single replies of a pipelined transaction
# --------------------------------------------------------------------------------------

EHLO = (
    b"250-mx.example.org Hello client.example [192.0.2.1]\r\n250-PIPELINING\r\n"
    b"250-SIZE 52428800\r\n250-ETRN\r\n250-STARTTLS\r\n250-AUTH PLAIN LOGIN\r\n"
    b"250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250-DSN\r\n250-SMTPUTF8\r\n250 CHUNKING\r\n"
)
SINGLES = (
    b"250 2.1.0 Ok\r\n" + b"250 2.1.5 Ok\r\n" * 8 + b"354 End data with <CR><LF>.<CR><LF>\r\n"
    b"250 2.0.0 Ok: queued as 4Xy2kq1Zz9\r\n"
)
REPLIES = b"220 mx.example.org ESMTP\r\n" + EHLO + SINGLES * 10
N_REPLIES = 2 + 11 * 10


def _replies(mod, buf: bytes) -> int:
    reader = mod.ReplyReader()
    reader.feed(buf)
    n = 0
    while reader.next_reply() is not None:
        n += 1
    return n


def test_replies(impl, measure):
    assert measure("replies", N_REPLIES, "replies", _replies, impl, REPLIES) == N_REPLIES


# --------------------------------------------------------------------------------------
# dot_stuff: a 1 MiB body handed over by an API caller
# --------------------------------------------------------------------------------------

BODY_CRLF = MESSAGES["10MiB"][: 1024 * 1024].rsplit(b"\r\n", 1)[0] + b"\r\n"
BODIES = {"lf": BODY_CRLF.replace(b"\r\n", b"\n"), "crlf": BODY_CRLF}


@pytest.mark.parametrize("endings", ["lf", "crlf"])
def test_dot_stuff(impl, measure, endings):
    body = BODIES[endings]
    out = measure(f"dot_stuff 1MiB {endings}", len(body), "bytes", impl.dot_stuff, body)
    assert out.endswith(b"\r\n.\r\n")
