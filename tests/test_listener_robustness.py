"""The listener (fastmta/server.py) against clients that misbehave at the transport level: a
client that half-closes, one that never reads its replies, one that guesses addresses, one
that trickles its message. Real clients on loopback, under uvloop and plain asyncio."""

from __future__ import annotations

import smtplib
import socket
import threading
import time

import pytest

from fastmta.protocol import server as S
from fastmta.protocol.errors import MailFrom
from fastmta.protocol.replies import reply
from fastmta.testing.smtpd import ThreadedSmtpd

LOCAL = {"policy": {"local_domains": ["local.test"]}}


@pytest.fixture(params=["uvloop", "asyncio"])
def smtpd(tmp_path, request):
    started = []

    def make(overrides=None):
        d = ThreadedSmtpd(
            str(tmp_path / f"spool{len(started)}"),
            overrides,
            use_uvloop=request.param == "uvloop",
        )
        started.append(d.start())
        return d

    yield make
    for d in started:
        d.stop()


def read_until_closed(s: socket.socket, timeout: float = 5.0) -> bytes:
    """Everything the server sends until it closes (bounded by ``timeout``)."""
    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = s.recv(65536)
        except TimeoutError:
            break
        if not chunk:
            return out
        out += chunk
    return out + b"<open>"


def at_data(port: int) -> socket.socket:
    """A raw client that said EHLO, MAIL, RCPT and DATA and got the 354."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    assert s.recv(1000).startswith(b"220")
    s.sendall(b"EHLO client.test\r\n")
    assert s.recv(1000).startswith(b"250")
    s.sendall(b"MAIL FROM:<a@remote.test>\r\nRCPT TO:<u@local.test>\r\nDATA\r\n")
    out = b""
    while not out.endswith(b"354 End data with <CR><LF>.<CR><LF>\r\n"):
        chunk = s.recv(1000)
        assert chunk, out
        out += chunk
    return s


# ---------------------------------------------------------------------------- half-close


def test_half_close_after_quit_still_gets_250_and_221(smtpd):
    """`nc -N` style: message and QUIT pipelined, then shutdown(SHUT_WR). The message is stored,
    so the client must get its 250 (else it retries: a duplicate)."""
    d = smtpd(LOCAL)
    s = at_data(d.port)
    s.sendall(b"Subject: x\r\n\r\nhello\r\n.\r\nQUIT\r\n")
    s.shutdown(socket.SHUT_WR)
    out = read_until_closed(s)
    s.close()
    assert out.startswith(b"250 2.0.0 Ok: queued as ") and out.endswith(b"221 2.0.0 Bye\r\n")
    assert len(d.submitted) == 1


def test_half_close_inside_data_closes_and_stores_nothing(smtpd):
    d = smtpd(LOCAL)
    s = at_data(d.port)
    s.sendall(b"Subject: x\r\n\r\nhalf a message\r\n")
    s.shutdown(socket.SHUT_WR)
    assert read_until_closed(s) == b""
    s.close()
    assert not d.submitted
    assert d.call(lambda: len(d.ctx.connections)) == 0


# ---------------------------------------------------------------------------- backpressure

NOOP = b"NOOP\r\n"


def flood(s: socket.socket, cap: int, stall: float = 1.0, limit: float = 20.0) -> int:
    """Send NOOPs without reading until the server stops taking them for ``stall`` seconds
    (or ``cap`` bytes or ``limit`` seconds); return the bytes sent."""
    chunk = NOOP * 10_000
    sent = 0
    s.setblocking(False)
    t0 = last = time.monotonic()
    while sent < cap and time.monotonic() - t0 < limit:
        try:
            n = s.send(chunk[sent % len(chunk) :] if sent % len(chunk) else chunk)
        except BlockingIOError:
            if time.monotonic() - last > stall:
                break
            time.sleep(0.01)
            continue
        except OSError:  # dropped by the server
            break
        sent += n
        last = time.monotonic()
    return sent


def buffered(d: ThreadedSmtpd) -> int:
    return d.call(
        lambda: sum(c.transport.get_write_buffer_size() for c in d.ctx.connections if c.transport)
    )


def not_reading_client(port: int) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    s.settimeout(5)
    assert s.recv(100).startswith(b"220")
    s.sendall(b"EHLO client.test\r\n")
    assert s.recv(1000).startswith(b"250")
    return s


def test_client_that_does_not_read_is_held_back_then_answered_in_full(smtpd):
    """Pipelined NOOPs, no reading: the server stops reading (its write buffer stays bounded)
    rather than buffering replies without limit; once the client reads, every command is
    answered (no deadlock)."""
    d = smtpd()
    s = not_reading_client(d.port)
    cap = 48 << 20
    sent = flood(s, cap)
    assert sent < 24 << 20, "the server kept reading although its replies were not read"
    assert buffered(d) < 4 << 20
    rest = (-sent) % len(NOOP)
    expected = (sent + rest) // len(NOOP)
    out = bytearray()

    def reader() -> None:
        s.settimeout(1)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not out.endswith(b"221 2.0.0 Bye\r\n"):
            try:
                chunk = s.recv(1 << 20)
            except (TimeoutError, BlockingIOError):
                continue
            if not chunk:
                break
            out.extend(chunk)

    t = threading.Thread(target=reader)
    t.start()
    s.setblocking(True)
    s.settimeout(30)
    s.sendall(NOOP[len(NOOP) - rest :] + b"QUIT\r\n")  # complete the last NOOP, then QUIT
    t.join(35)
    s.close()
    assert out.endswith(b"221 2.0.0 Bye\r\n")
    assert out.count(b"250 2.0.0 Ok\r\n") == expected


def test_client_that_never_reads_is_dropped_by_the_idle_timeout(smtpd):
    d = smtpd({"limits": {"command_timeout": 0.5}})
    s = not_reading_client(d.port)
    flood(s, 48 << 20)
    deadline = time.monotonic() + 10
    while d.call(lambda: len(d.ctx.connections)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert d.call(lambda: len(d.ctx.connections)) == 0
    s.close()


# ---------------------------------------------------------------------------- error limit


def test_refused_recipients_count_towards_max_errors(smtpd):
    """Postfix counts refused RCPTs towards smtpd_hard_error_limit: a client harvesting
    addresses or probing for a relay is cut off."""
    d = smtpd(
        {
            "policy": {"mynetworks": ["10.0.0.0/8"], "local_domains": ["local.test"]},
            "local": {"users": ["known@local.test"]},
            "limits": {"max_errors": 6},
        }
    )
    s = socket.create_connection(("127.0.0.1", d.port), timeout=5)
    s.recv(1000)
    s.sendall(b"EHLO client.test\r\n")
    s.recv(1000)
    guesses = b"".join(
        b"RCPT TO:<guess%d@local.test>\r\nRCPT TO:<x%d@victim.test>\r\n" % (i, i) for i in range(50)
    )
    s.sendall(b"MAIL FROM:<a@remote.test>\r\n" + guesses)
    lines = read_until_closed(s).splitlines()
    s.close()
    assert lines[0] == b"250 2.1.0 Ok"
    assert [x[:9] for x in lines[1:7]] == [b"550 5.1.1", b"554 5.7.1"] * 3
    assert lines[7:] == [b"421 4.7.0 Error: too many errors"]


def test_a_few_refused_recipients_do_not_stop_a_transaction(smtpd):
    d = smtpd(
        {
            "policy": {"local_domains": ["local.test"]},
            "local": {"users": ["known@local.test"]},
            "limits": {"max_errors": 6},
        }
    )
    with smtplib.SMTP("127.0.0.1", d.port, local_hostname="client.test", timeout=10) as smtp:
        for _ in range(2):  # the count is per session, like Postfix's
            smtp.ehlo()
            assert smtp.mail("a@remote.test")[0] == 250
            assert smtp.rcpt("gone1@local.test")[0] == 550
            assert smtp.rcpt("known@local.test")[0] == 250
            assert smtp.rcpt("gone2@local.test")[0] == 550
            assert smtp.data(b"Subject: x\r\n\r\nhi\r\n")[0] == 250
    assert [r.address for m in d.submitted for r in m.envelope.recipients] == [
        "known@local.test"
    ] * 2


def test_session_counts_a_refused_mail_and_rcpt_not_a_refused_message():
    s = S.ServerSession(S.SessionConfig(max_errors=2))
    s.greet()
    s.receive(b"EHLO c\r\n")
    assert s.next_event() is None
    s.receive(b"MAIL FROM:<a@b.test>\r\n")
    assert isinstance(s.next_event(), S.MailEvent)
    s.reject(reply(550, "5.7.1", "Sender refused"))
    assert s.errors == 1 and not s.closed
    s.receive(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\n")
    assert isinstance(s.next_event(), S.MailEvent)
    s.accept()
    assert isinstance(s.next_event(), S.RcptEvent)
    s.reject(reply(451, "4.3.0", "Try later"))
    assert s.closed
    assert s.data_to_send().endswith(b"421 4.7.0 Error: too many errors\r\n")
    # a message refused (spool full, our fault) is not the client's error
    t = S.ServerSession(S.SessionConfig(max_errors=1))
    t.greet()
    t.state = S.State.RCPT
    t._waiting = S.MessageEvent(MailFrom("a@b.test"), [], [], 0)
    t.reject(reply(452, "4.3.1", "Insufficient system storage"))
    assert t.errors == 0 and not t.closed


# ---------------------------------------------------------------------------- data deadline


@pytest.mark.parametrize("verb", [b"DATA\r\n", b"BDAT 100000 LAST\r\n"])
def test_trickled_content_is_cut_off_at_data_timeout(smtpd, verb):
    """limits.data_timeout bounds the whole content, not the gap between reads."""
    d = smtpd({**LOCAL, "limits": {"data_timeout": 1.0, "command_timeout": 5.0}})
    s = socket.create_connection(("127.0.0.1", d.port), timeout=5)
    s.recv(1000)
    s.sendall(b"EHLO client.test\r\n")
    s.recv(1000)
    s.sendall(b"MAIL FROM:<a@remote.test>\r\nRCPT TO:<u@local.test>\r\n" + verb)
    t0 = time.monotonic()
    s.settimeout(0.25)
    out = b""
    while time.monotonic() - t0 < 6 and b"421" not in out:
        try:
            s.sendall(b"x")
            out += s.recv(1000)
        except TimeoutError:
            pass
        except OSError:
            break
    elapsed = time.monotonic() - t0
    out += read_until_closed(s, 2)
    s.close()
    assert b"421 4.4.2" in out and 0.8 < elapsed < 3.5
    assert not out.endswith(b"<open>")
    assert not d.submitted


def test_data_deadline_is_per_message(smtpd):
    """The deadline starts at each message's content, not at the session's first one."""
    d = smtpd({**LOCAL, "limits": {"data_timeout": 1.0, "command_timeout": 5.0}})
    with smtplib.SMTP("127.0.0.1", d.port, local_hostname="client.test", timeout=10) as smtp:
        for _ in range(3):
            assert (
                smtp.sendmail("a@remote.test", ["u@local.test"], b"Subject: x\r\n\r\nhi\r\n") == {}
            )
            time.sleep(0.6)
    assert len(d.submitted) == 3


def test_data_deadline_spans_bdat_chunks(smtpd):
    """RFC 3030: a message in chunks is one content; the gaps between chunks count."""
    d = smtpd({**LOCAL, "limits": {"data_timeout": 1.0, "command_timeout": 5.0}})
    with smtplib.SMTP("127.0.0.1", d.port, local_hostname="client.test", timeout=10) as smtp:
        smtp.ehlo()
        assert smtp.mail("a@remote.test")[0] == 250
        assert smtp.rcpt("u@local.test")[0] == 250
        replies = []
        for _ in range(3):
            smtp.send(b"BDAT 4\r\nhi\r\n")
            replies.append(smtp.getreply()[0])
            if replies[-1] != 250:
                break
            time.sleep(0.6)
    assert replies[:2] == [250, 250] and replies[-1] == 421
    assert not d.submitted
