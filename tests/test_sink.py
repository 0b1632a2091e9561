"""The test sink (fastmta/testing/sink.py): every Behaviour a delivery test relies on, checked
with a real client (Python's smtplib, or raw bytes over a socket) on loopback, under uvloop and
under plain asyncio. The check is always what the sink recorded (messages and counters)."""

from __future__ import annotations

import asyncio
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import time

import pytest

from fastmta.protocol.replies import reply
from fastmta.testing.sink import Behaviour, Sink, SinkMessage, unused_port

TIMEOUT = 5.0
BODY = b"Subject: hello\r\n\r\n.a line that starts with a dot\r\n..two dots\r\n.\r\nend\r\n"


@pytest.fixture(params=["uvloop", "asyncio"])
def make_sink(request):
    """Start a sink with the given Behaviour on the loop under test; stop it afterwards."""
    import uvloop

    factory = uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop
    sinks: list[Sink] = []

    def make(behaviour: Behaviour | None = None) -> Sink:
        sink = Sink(behaviour=behaviour, loop_factory=factory).start()
        sinks.append(sink)
        return sink

    yield make
    for sink in sinks:
        sink.stop()


def connect(sink: Sink, timeout: float = TIMEOUT) -> socket.socket:
    return socket.create_connection((sink.host, sink.port), timeout=timeout)


def read_reply(f) -> bytes:
    """One whole (possibly multi-line) reply from a socket file."""
    out = b""
    while True:
        line = f.readline()
        if not line:
            return out
        out += line
        if line[3:4] != b"-":
            return out


def no_verify() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


# ------------------------------------------------------------------------- the good case


def test_accepts_and_records_a_message(make_sink):
    sink = make_sink()
    with smtplib.SMTP(sink.host, sink.port, local_hostname="client.test", timeout=TIMEOUT) as c:
        code, caps = c.ehlo()
        assert code == 250
        for kw in (b"PIPELINING", b"CHUNKING", b"SMTPUTF8", b"SIZE 52428800"):
            assert kw in caps
        assert b"STARTTLS" not in caps  # off unless asked for
        refused = c.sendmail("from@a.test", ["x@b.test", "y@c.test"], BODY)
        assert refused == {}
    assert sink.wait_for(1)
    (m,) = sink.messages
    assert isinstance(m, SinkMessage)
    assert m.sender == "from@a.test"
    assert m.recipients == ["x@b.test", "y@c.test"]
    assert m.data == BODY  # dot-stuffing removed again
    assert m.helo == "client.test"
    assert m.tls is False
    assert m.peer.startswith("127.0.0.1:")
    assert m.mail_params.size == len(BODY)
    assert abs(m.received - time.time()) < 30
    assert (sink.count, sink.connections, sink.transactions) == (1, 1, 1)
    assert sink.address == f"127.0.0.1:{sink.port}"


def test_several_messages_on_one_connection_and_keep_false(make_sink):
    sink = make_sink(Behaviour(keep=False))
    with smtplib.SMTP(sink.host, sink.port, timeout=TIMEOUT) as c:
        for i in range(5):
            c.sendmail("s@a.test", [f"r{i}@b.test"], b"Subject: %d\r\n\r\nx\r\n" % i)
    assert sink.wait_for(5)
    assert sink.count == 5 and sink.transactions == 5 and sink.connections == 1
    assert sink.messages == []  # counted, not kept


def test_wait_for_times_out(make_sink):
    sink = make_sink()
    t0 = time.monotonic()
    assert sink.wait_for(1, timeout=0.2) is False
    assert time.monotonic() - t0 < 2


def test_behaviour_swap_applies_to_new_connections(make_sink):
    sink = make_sink()
    with smtplib.SMTP(sink.host, sink.port, timeout=TIMEOUT) as old:
        old.ehlo()
        sink.behaviour = Behaviour(mail_reply=lambda s: reply(550, "5.7.1", "go away"))
        with smtplib.SMTP(sink.host, sink.port, timeout=TIMEOUT) as new:
            with pytest.raises(smtplib.SMTPSenderRefused) as e:
                new.sendmail("s@a.test", ["r@b.test"], b"\r\nx\r\n")
            assert e.value.smtp_code == 550
        old.sendmail("s@a.test", ["r@b.test"], b"\r\nx\r\n")  # the old one keeps its behaviour
    assert sink.wait_for(1) and sink.count == 1


def test_callback_that_raises_gives_451_and_is_recorded(make_sink):
    def boom(address: str):
        raise ValueError("bug in test")

    sink = make_sink(Behaviour(rcpt_reply=boom))
    with smtplib.SMTP(sink.host, sink.port, timeout=TIMEOUT) as c:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as e:
            c.sendmail("s@a.test", ["r@b.test"], b"\r\nx\r\n")
    assert e.value.recipients["r@b.test"][0] == 451
    assert isinstance(sink.errors[0], ValueError)


# ------------------------------------------------------------------------- faults


def test_dead_mx_is_a_refused_connection():
    port = unused_port()
    with pytest.raises(ConnectionRefusedError):
        smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT)


def test_421_at_greeting_then_close(make_sink):
    sink = make_sink(Behaviour(greeting=reply(421, "4.3.2", "busy")))
    with pytest.raises(smtplib.SMTPConnectError) as e:
        smtplib.SMTP(sink.host, sink.port, timeout=TIMEOUT)
    assert e.value.smtp_code == 421
    with connect(sink) as s, s.makefile("rb") as f:
        assert read_reply(f) == b"421 4.3.2 busy\r\n"
        assert f.readline() == b""  # RFC 5321 3.8: closed after 421
    assert sink.count == 0 and sink.connections == 2


def test_554_at_greeting_stays_and_refuses_everything_but_quit(make_sink):
    sink = make_sink(Behaviour(greeting=reply(554, "5.3.2", "no service")))
    with connect(sink) as s, s.makefile("rb") as f:
        assert read_reply(f) == b"554 5.3.2 no service\r\n"
        s.sendall(b"EHLO client.test\r\n")
        assert read_reply(f).startswith(b"503 ")  # RFC 5321 3.1
        s.sendall(b"MAIL FROM:<s@a.test>\r\n")
        assert read_reply(f).startswith(b"503 ")
        s.sendall(b"QUIT\r\n")
        assert read_reply(f).startswith(b"221 ")
        assert f.readline() == b""
    assert sink.transactions == 0


def test_custom_220_greeting_text(make_sink):
    sink = make_sink(Behaviour(greeting=reply(220, None, "mx.example ESMTP hello")))
    with smtplib.SMTP(sink.host, sink.port, timeout=TIMEOUT) as c:
        c.sendmail("s@a.test", ["r@b.test"], b"\r\nx\r\n")
    with connect(sink) as s, s.makefile("rb") as f:
        assert read_reply(f) == b"220 mx.example ESMTP hello\r\n"
    assert sink.wait_for(1)


def test_4xx_for_some_recipients_2xx_for_others(make_sink):
    def rcpt(address: str):
        return reply(451, "4.2.1", "later") if address.startswith("b") else None

    sink = make_sink(Behaviour(rcpt_reply=rcpt))
    with smtplib.SMTP(sink.host, sink.port, timeout=TIMEOUT) as c:
        refused = c.sendmail("s@a.test", ["a1@x.test", "b1@x.test", "a2@x.test"], BODY)
    assert refused == {"b1@x.test": (451, b"4.2.1 later")}
    assert sink.wait_for(1)
    assert sink.messages[0].recipients == ["a1@x.test", "a2@x.test"]


def test_every_recipient_refused_means_no_message(make_sink):
    sink = make_sink(Behaviour(rcpt_reply=lambda a: reply(550, "5.1.1", "no such user")))
    with smtplib.SMTP(sink.host, sink.port, timeout=TIMEOUT) as c:
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            c.sendmail("s@a.test", ["a@x.test", "b@x.test"], BODY)
    assert sink.count == 0 and sink.transactions == 1


def test_sender_refused(make_sink):
    sink = make_sink(
        Behaviour(mail_reply=lambda s: reply(550, "5.7.1", "no") if s == "bad@a.test" else None)
    )
    with smtplib.SMTP(sink.host, sink.port, timeout=TIMEOUT) as c:
        with pytest.raises(smtplib.SMTPSenderRefused) as e:
            c.sendmail("bad@a.test", ["r@b.test"], BODY)
        assert e.value.smtp_code == 550
        c.sendmail("good@a.test", ["r@b.test"], BODY)
    assert sink.wait_for(1)
    assert [m.sender for m in sink.messages] == ["good@a.test"]
    assert sink.transactions == 1


def test_5xx_after_data(make_sink):
    seen: list[SinkMessage] = []

    def data(m: SinkMessage):
        seen.append(m)
        return reply(554, "5.7.1", "spam") if b"spam" in m.data else None

    sink = make_sink(Behaviour(data_reply=data))
    with smtplib.SMTP(sink.host, sink.port, timeout=TIMEOUT) as c:
        with pytest.raises(smtplib.SMTPDataError) as e:
            c.sendmail("s@a.test", ["r@b.test"], b"Subject: spam\r\n\r\nbuy\r\n")
        assert e.value.smtp_code == 554
        c.sendmail("s@a.test", ["r@b.test"], b"Subject: ham\r\n\r\nhi\r\n")
    assert sink.wait_for(1)
    assert [m.data for m in seen] == [
        b"Subject: spam\r\n\r\nbuy\r\n",
        b"Subject: ham\r\n\r\nhi\r\n",
    ]
    assert [m.data for m in sink.messages] == [b"Subject: ham\r\n\r\nhi\r\n"]


def test_disconnect_in_the_middle_of_data(make_sink):
    sink = make_sink(Behaviour(disconnect_in_data=True))
    big = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 4000  # 4 MB: many reads
    with smtplib.SMTP(sink.host, sink.port, timeout=TIMEOUT) as c:
        # SMTPServerDisconnected, or a reset/broken pipe while still writing: all OSError
        with pytest.raises(OSError):
            c.sendmail("s@a.test", ["r@b.test"], big)
    assert sink.count == 0 and sink.transactions == 1


def test_disconnect_in_data_with_bdat_in_one_write(make_sink):
    """A chunking client sends MAIL, RCPT and BDAT LAST with its content in one write: the
    sink answers MAIL and RCPT, then hangs up without answering the content."""
    sink = make_sink(Behaviour(disconnect_in_data=True))
    with connect(sink) as s, s.makefile("rb") as f:
        read_reply(f)
        s.sendall(b"EHLO c.test\r\n")
        read_reply(f)
        s.sendall(b"MAIL FROM:<s@a.test>\r\nRCPT TO:<r@b.test>\r\nBDAT 4 LAST\r\nhi\r\n")
        assert read_reply(f).startswith(b"250 ")
        assert read_reply(f).startswith(b"250 ")
        assert f.readline() == b""
    assert sink.count == 0


def test_slow_server_hits_the_client_timeout(make_sink):
    sink = make_sink(Behaviour(delay=1.0))
    t0 = time.monotonic()
    with pytest.raises((TimeoutError, smtplib.SMTPServerDisconnected)):
        smtplib.SMTP(sink.host, sink.port, timeout=0.2)  # greeting is 1 s late
    assert time.monotonic() - t0 < 0.9


def test_slow_server_delays_every_reply(make_sink):
    sink = make_sink(Behaviour(delay=0.05))
    t0 = time.monotonic()
    with smtplib.SMTP(sink.host, sink.port, timeout=TIMEOUT) as c:
        c.sendmail("s@a.test", ["r@b.test"], BODY)  # greeting, EHLO, MAIL, RCPT, DATA, dot
    assert time.monotonic() - t0 >= 6 * 0.05
    assert sink.wait_for(1)


def test_slow_server_keeps_pipelined_replies_in_order(make_sink):
    sink = make_sink(Behaviour(delay=0.02))
    with connect(sink) as s, s.makefile("rb") as f:
        read_reply(f)
        s.sendall(b"EHLO c.test\r\n")
        read_reply(f)
        s.sendall(b"MAIL FROM:<s@a.test>\r\nRCPT TO:<r1@b.test>\r\nRCPT TO:<r2@b.test>\r\nDATA\r\n")
        codes = [read_reply(f)[:3] for _ in range(4)]
        assert codes == [b"250", b"250", b"250", b"354"]
        s.sendall(b"hi\r\n.\r\nQUIT\r\n")
        assert read_reply(f).startswith(b"250 ")
        assert read_reply(f).startswith(b"221 ")
    assert sink.wait_for(1)
    assert sink.messages[0].recipients == ["r1@b.test", "r2@b.test"]


def test_stall_after_data_times_the_client_out(make_sink):
    sink = make_sink(Behaviour(stall_after_data=True))
    with smtplib.SMTP(sink.host, sink.port, timeout=0.5) as c:
        t0 = time.monotonic()
        with pytest.raises(smtplib.SMTPServerDisconnected, match="timed out"):
            c.sendmail("s@a.test", ["r@b.test"], BODY)
        assert 0.4 < time.monotonic() - t0 < 3
    assert sink.count == 0 and sink.transactions == 1


def test_server_without_pipelining(make_sink):
    sink = make_sink(Behaviour(pipelining=False))
    with smtplib.SMTP(sink.host, sink.port, timeout=TIMEOUT) as c:
        c.ehlo()
        assert not c.has_extn("pipelining")
        assert c.has_extn("chunking")
        c.sendmail("s@a.test", ["r@b.test"], BODY)  # smtplib waits for every reply
    assert sink.wait_for(1)
    # a client that pipelines anyway is cut off (RFC 2920 3.1; Postfix 3.9 does the same)
    with connect(sink) as s, s.makefile("rb") as f:
        read_reply(f)
        s.sendall(b"EHLO c.test\r\n")
        read_reply(f)
        s.sendall(b"MAIL FROM:<s@a.test>\r\nRCPT TO:<r@b.test>\r\n")
        assert read_reply(f).startswith(b"554 5.5.0")
        assert f.readline() == b""
    assert sink.transactions == 1


def test_pipelining_is_accepted_when_offered(make_sink):
    sink = make_sink()
    with connect(sink) as s, s.makefile("rb") as f:
        read_reply(f)
        s.sendall(b"EHLO c.test\r\n")
        assert b"PIPELINING" in read_reply(f)
        s.sendall(b"MAIL FROM:<s@a.test>\r\nRCPT TO:<r@b.test>\r\nDATA\r\n")
        assert [read_reply(f)[:3] for _ in range(3)] == [b"250", b"250", b"354"]
        s.sendall(b"x\r\n.\r\n")
        assert read_reply(f).startswith(b"250 ")
    assert sink.wait_for(1)


def test_server_without_ehlo_client_falls_back_to_helo(make_sink):
    sink = make_sink(Behaviour(ehlo=False))
    with smtplib.SMTP(sink.host, sink.port, local_hostname="old.test", timeout=TIMEOUT) as c:
        c.sendmail("s@a.test", ["r@b.test"], BODY)  # smtplib tries EHLO, then says HELO
        assert c.does_esmtp is False and c.helo_resp is not None
    assert sink.wait_for(1)
    assert sink.messages[0].helo == "old.test"
    with connect(sink) as s, s.makefile("rb") as f:
        read_reply(f)
        s.sendall(b"EHLO c.test\r\n")
        assert read_reply(f).startswith(b"502 ")  # RFC 5321 4.1.4: a pre-ESMTP server
        s.sendall(b"HELO c.test\r\n")
        assert read_reply(f) == b"250 sink.localhost\r\n"


def test_server_without_chunking_or_smtputf8(make_sink):
    sink = make_sink(Behaviour(chunking=False, smtputf8=False, size=1000))
    with connect(sink) as s, s.makefile("rb") as f:
        read_reply(f)
        s.sendall(b"EHLO c.test\r\n")
        caps = read_reply(f)
        assert b"CHUNKING" not in caps and b"SMTPUTF8" not in caps
        assert b"PIPELINING" in caps and b"SIZE 1000\r\n" in caps
        s.sendall(b"MAIL FROM:<s@a.test> SMTPUTF8\r\n")
        assert read_reply(f).startswith(b"555 ")
        s.sendall(b"MAIL FROM:<s@a.test> SIZE=2000\r\n")
        assert read_reply(f).startswith(b"552 ")  # RFC 1870 6.2


def test_content_over_the_size_limit_is_refused_and_the_session_goes_on(make_sink):
    sink = make_sink(Behaviour(size=1000))
    with smtplib.SMTP(sink.host, sink.port, timeout=TIMEOUT) as c:
        c.ehlo()
        c.esmtp_features.pop("size")  # make smtplib send it anyway, without SIZE=
        with pytest.raises(smtplib.SMTPDataError) as e:
            c.sendmail("s@a.test", ["r@b.test"], b"\r\n" + b"x" * 900 + b"\r\n" + b"y" * 900)
        assert e.value.smtp_code == 552  # RFC 1870 6.3
        c.sendmail("s@a.test", ["r@b.test"], BODY)
    assert sink.wait_for(1) and sink.count == 1


def test_server_without_starttls(make_sink):
    sink = make_sink()
    with smtplib.SMTP(sink.host, sink.port, timeout=TIMEOUT) as c:
        with pytest.raises(smtplib.SMTPNotSupportedError):
            c.starttls(context=no_verify())


def test_starttls_with_smtplib(make_sink, tmp_path):
    sink = make_sink(Behaviour(starttls=True))
    with smtplib.SMTP(sink.host, sink.port, local_hostname="tls.test", timeout=TIMEOUT) as c:
        c.ehlo()
        assert c.has_extn("starttls")
        assert c.starttls(context=no_verify())[0] == 220
        c.ehlo()
        assert not c.has_extn("starttls")  # RFC 3207 4.2: not offered again
        assert isinstance(c.sock, ssl.SSLSocket) and c.sock.version() in ("TLSv1.2", "TLSv1.3")
        c.sendmail("s@a.test", ["r@b.test"], BODY)
        c.sendmail("s@a.test", ["r2@b.test"], BODY)
    assert sink.wait_for(2)
    assert [m.tls for m in sink.messages] == [True, True]
    assert sink.messages[0].data == BODY
    assert sink.messages[0].helo == "tls.test"


def test_starttls_with_given_certificate(make_sink, tmp_path):
    from fastmta.testing.certs import make_self_signed

    cert, key = make_self_signed(tmp_path)
    sink = make_sink(Behaviour(starttls=True, cert=cert, key=key))
    ctx = ssl.create_default_context(cafile=cert)  # verification on: it must be our cert
    with smtplib.SMTP("localhost", sink.port, timeout=TIMEOUT) as c:
        c.starttls(context=ctx)
        c.sendmail("s@a.test", ["r@b.test"], BODY)
    assert sink.wait_for(1) and sink.messages[0].tls


def test_bdat_raw(make_sink):
    sink = make_sink()
    chunk1 = b"Subject: bdat\r\n\r\n.starts with a dot\r\n"
    chunk2 = b"no final newline"
    with connect(sink) as s, s.makefile("rb") as f:
        assert read_reply(f).startswith(b"220 ")
        s.sendall(b"EHLO c.test\r\n")
        assert b"CHUNKING" in read_reply(f)
        s.sendall(
            b"MAIL FROM:<s@a.test> BODY=8BITMIME\r\nRCPT TO:<r@b.test>\r\n"
            + b"BDAT %d\r\n" % len(chunk1)
            + chunk1
            + b"BDAT %d LAST\r\n" % len(chunk2)
            + chunk2
        )
        codes = [read_reply(f) for _ in range(4)]
        assert [c[:3] for c in codes] == [b"250", b"250", b"250", b"250"]
        assert b"queued" in codes[3]
        s.sendall(b"QUIT\r\n")
        assert read_reply(f).startswith(b"221 ")
    assert sink.wait_for(1)
    (m,) = sink.messages
    # BDAT content is not dot-stuffed on the wire; the stored form ends with whole lines
    assert m.data == chunk1 + chunk2 + b"\r\n"
    assert m.mail_params.body == "8BITMIME"


def test_usable_from_asyncio_run(make_sink):
    """An async test (the delivery half's) talks to the sink from its own event loop."""
    sink = make_sink()

    async def client() -> list[bytes]:
        r, w = await asyncio.open_connection(sink.host, sink.port)
        got = [await r.readline()]
        w.write(b"HELO c.test\r\n")
        got.append(await r.readline())
        w.write(b"MAIL FROM:<>\r\nRCPT TO:<r@b.test>\r\n")  # after HELO: no pipelining
        got.append(await r.readline())
        got.append(await r.read())  # then the sink hangs up
        w.close()
        await w.wait_closed()
        return got

    got = asyncio.run(asyncio.wait_for(client(), TIMEOUT))
    assert got[0].startswith(b"220 ") and got[1].startswith(b"250 ")
    assert got[2].startswith(b"554 5.5.0") and got[3] == b""
    assert sink.transactions == 0


def test_stop_closes_open_connections():
    sink = Sink().start()
    s = socket.create_connection((sink.host, sink.port), timeout=TIMEOUT)
    f = s.makefile("rb")
    assert read_reply(f).startswith(b"220 ")
    sink.stop()
    assert f.readline() == b""
    s.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((sink.host, sink.port), timeout=TIMEOUT)


def test_command_line_counts_and_exits_when_done():
    port = unused_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastmta.testing.sink", "--listen", f"127.0.0.1:{port}"]
        + ["--expect", "3", "--exit-when-done"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == f"listening on 127.0.0.1:{port}"
        proc.send_signal(signal.SIGUSR1)  # a count line on demand
        assert proc.stdout.readline().strip() == "count 0 connections 0"
        with smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT) as c:
            for _ in range(3):
                c.sendmail("s@a.test", ["r@b.test"], BODY)
        out, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert "done 3 messages in" in out and "msg/s" in out
    assert "count 3 connections 1" in out
