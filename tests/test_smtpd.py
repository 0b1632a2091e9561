"""The SMTP listener (fastmta/server.py) with a real spool, driven by real clients on
loopback: Python's smtplib, raw sockets, swaks."""

from __future__ import annotations

import asyncio
import base64
import shutil
import smtplib
import socket
import ssl
import subprocess
import time

import pytest
from scram_client import ScramClient

from fastmta.auth import set_password
from fastmta.spool import Spool, SpoolError
from fastmta.testing.certs import make_self_signed
from fastmta.testing.smtpd import ThreadedSmtpd

MSG = b"From: a@b.test\r\nTo: c@d.test\r\nSubject: hi\r\n\r\nhello\r\n.dot line\r\n"


@pytest.fixture(params=["uvloop", "asyncio"])
def loop_kind(request):
    return request.param


@pytest.fixture
def smtpd(tmp_path, loop_kind):
    started = []

    def make(overrides=None, **kw):
        d = ThreadedSmtpd(
            str(tmp_path / f"spool{len(started)}"),
            overrides,
            use_uvloop=loop_kind == "uvloop",
            **kw,
        )
        started.append(d.start())
        return d

    yield make
    for d in started:
        d.stop()


def reopen(spool_dir):
    async def go():
        s = Spool(spool_dir)
        msgs = await s.open()
        out = [(m.envelope, s.read(m)) for m in msgs]
        await s.close()
        return out

    return asyncio.run(go())


def test_smtplib_message_is_spooled_with_received(smtpd):
    d = smtpd()
    with smtplib.SMTP("127.0.0.1", d.port) as c:
        c.ehlo("client.test")
        assert c.has_extn("pipelining") and c.has_extn("chunking") and c.has_extn("smtputf8")
        assert int(c.esmtp_features["size"]) == 50 << 20
        refused = c.sendmail("a@b.test", ["c@d.test", "e@f.test"], MSG)
        assert refused == {}
    d.stop()
    ((env, data),) = reopen(d.spool_dir)
    assert env.sender == "a@b.test" and [r.address for r in env.recipients] == [
        "c@d.test",
        "e@f.test",
    ]
    assert data.startswith(
        b"Received: from client.test ([127.0.0.1])\r\n\tby mx.test (fastmta) with ESMTP id "
    )
    assert data.endswith(MSG.replace(b"\r\n.dot", b"\r\n..dot"))  # stored in wire form
    assert env.client == "[127.0.0.1] client.test"


def test_reply_names_the_queue_id(smtpd):
    d = smtpd()
    with smtplib.SMTP("127.0.0.1", d.port) as c:
        c.ehlo("x")
        c.mail("a@b.test")
        c.rcpt("c@d.test")
        code, text = c.data(MSG)
    assert code == 250 and text.startswith(b"2.0.0 Ok: queued as ")
    assert d.submitted[0].envelope.id == text.split()[-1].decode()


def test_relay_denied_outside_mynetworks_and_local_domain_accepted(smtpd):
    d = smtpd({"policy": {"mynetworks": ["127.0.0.2/32"], "local_domains": ["here.test"]}})
    with smtplib.SMTP("127.0.0.1", d.port, source_address=("127.0.0.1", 0)) as c:
        c.ehlo("x")
        c.mail("a@b.test")
        code, text = c.rcpt("c@elsewhere.test")
        assert (code, text) == (554, b"5.7.1 Relay access denied")
        assert c.rcpt("user@here.test")[0] == 250
    with smtplib.SMTP("127.0.0.1", d.port, source_address=("127.0.0.2", 0)) as c:
        c.ehlo("x")
        c.mail("a@b.test")
        assert c.rcpt("c@elsewhere.test")[0] == 250


def test_unknown_local_user_rejected_at_rcpt(smtpd):
    d = smtpd({"policy": {"local_domains": ["here.test"]}, "local": {"users": ["alice@here.test"]}})
    with smtplib.SMTP("127.0.0.1", d.port) as c:
        c.ehlo("x")
        c.mail("a@b.test")
        assert c.rcpt("alice@here.test")[0] == 250
        code, text = c.rcpt("bob@here.test")
        assert code == 550 and text.startswith(b"5.1.1")


@pytest.fixture
def tls_files(tmp_path):
    cert, key = make_self_signed(str(tmp_path))
    users = tmp_path / "users"
    set_password(str(users), "alice", "s3cret")
    return cert, key, str(users)


def client_tls():
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def test_starttls_auth_and_relay(smtpd, tls_files):
    cert, key, users = tls_files
    d = smtpd(
        {
            "tls": {"cert_file": cert, "key_file": key},
            "policy": {"users_file": users, "mynetworks": ["127.0.0.2/32"]},
            "listener": [{"address": "127.0.0.1:2525", "role": "relay", "tls": "starttls"}],
        }
    )
    with smtplib.SMTP("127.0.0.1", d.port) as c:
        c.ehlo("x")
        assert c.has_extn("starttls") and not c.has_extn("auth")  # AUTH only after TLS
        c.starttls(context=client_tls())
        c.ehlo("x")
        assert "PLAIN" in c.esmtp_features["auth"] and not c.has_extn("starttls")
        with pytest.raises(smtplib.SMTPAuthenticationError) as e:
            c.login("alice", "wrong")
        assert e.value.smtp_code == 535
        c.login("alice", "s3cret")
        assert c.sendmail("a@b.test", ["c@elsewhere.test"], MSG) == {}
    ((env, data),) = [(m.envelope, None) for m in d.submitted]
    assert env.auth == "alice"
    d.stop()
    ((env, data),) = reopen(d.spool_dir)
    assert b"with ESMTPSA id" in data


def test_users_file_changes_take_effect_at_the_next_auth(smtpd, tls_files):
    """`fastmta passwd` (set_password) while the server runs: the new user can log in and a
    changed password is the one that counts, without a reload; a file broken meanwhile keeps
    the table that was loaded."""
    cert, key, users = tls_files
    d = smtpd(
        {
            "tls": {"cert_file": cert, "key_file": key},
            "policy": {"users_file": users},
            "listener": [{"address": "127.0.0.1:2525", "tls": "starttls"}],
        }
    )

    def login(user: str, password: str) -> int:
        with smtplib.SMTP("127.0.0.1", d.port) as c:
            c.starttls(context=client_tls())
            c.ehlo("x")
            try:
                return c.login(user, password)[0]
            except smtplib.SMTPAuthenticationError as e:
                return e.smtp_code

    assert login("bob", "pw1") == 535
    set_password(users, "bob", "pw1")
    assert login("bob", "pw1") == 235
    set_password(users, "alice", "new")
    assert login("alice", "s3cret") == 535 and login("alice", "new") == 235
    with open(users, "a") as f:
        f.write("broken line without a hash\n")
    assert login("bob", "pw1") == 235  # the last good table stays


def test_auth_login_mechanism(smtpd, tls_files):
    cert, key, users = tls_files
    d = smtpd(
        {
            "tls": {"cert_file": cert, "key_file": key},
            "policy": {"users_file": users},
            "listener": [{"address": "127.0.0.1:2525", "tls": "starttls"}],
        }
    )
    with smtplib.SMTP("127.0.0.1", d.port) as c:
        c.starttls(context=client_tls())
        c.ehlo("x")
        c.user, c.password = "alice", "s3cret"
        code, _ = c.auth("LOGIN", c.auth_login, initial_response_ok=False)
        assert code == 235


def test_auth_scram_sha_256(smtpd, tls_files):
    """SCRAM-SHA-256 (RFC 7677) over STARTTLS: the client proves the password without sending
    it, the server proves it holds the keys (its signature in a 334, answered by an empty
    line), then 235; a wrong password gets 535."""
    cert, key, users = tls_files
    d = smtpd(
        {
            "tls": {"cert_file": cert, "key_file": key},
            "policy": {"users_file": users},
            "listener": [{"address": "127.0.0.1:2525", "tls": "starttls"}],
        }
    )
    b64 = base64.b64encode

    def exchange(password: str) -> tuple[int, bool]:
        with smtplib.SMTP("127.0.0.1", d.port) as c:
            c.starttls(context=client_tls())
            c.ehlo("x")
            assert c.esmtp_features["auth"].split()[0] == "SCRAM-SHA-256"
            client = ScramClient("alice", password)
            code, first = c.docmd("AUTH", "SCRAM-SHA-256 " + b64(client.first()).decode())
            assert code == 334
            code, final = c.docmd(b64(client.final(base64.b64decode(first))).decode())
            if code != 334:
                return code, False
            signed = client.check(base64.b64decode(final))
            code, text = c.docmd("")
            return code, signed

    assert exchange("s3cret") == (235, True)
    assert exchange("wrong") == (535, False)


def test_submission_requires_auth_and_adds_missing_fields(smtpd, tls_files):
    cert, key, users = tls_files
    d = smtpd(
        {
            "tls": {"cert_file": cert, "key_file": key},
            "policy": {"users_file": users},
            "listener": [{"address": "127.0.0.1:2525", "role": "submission", "tls": "implicit"}],
        }
    )
    with smtplib.SMTP_SSL("127.0.0.1", d.port, context=client_tls()) as c:
        c.ehlo("x")
        code, text = c.mail("a@b.test")
        assert (code, text) == (530, b"5.7.0 Authentication required")
        c.rset()
        c.login("alice", "s3cret")
        c.sendmail("alice@b.test", ["c@d.test"], b"Subject: no id\r\n\r\nbody\r\n")
    d.stop()
    ((env, data),) = reopen(d.spool_dir)
    head = data.split(b"\r\n\r\n")[0]
    assert b"\r\nMessage-ID: <" in head and b"\r\nDate: " in head
    assert env.message_id and f"\r\nMessage-ID: {env.message_id}\r\n".encode() in head


def test_failed_auth_slows_down_and_disconnects(smtpd, tls_files):
    cert, key, users = tls_files
    d = smtpd(
        {
            "tls": {"cert_file": cert, "key_file": key},
            "policy": {"users_file": users},
            "limits": {"auth_failure_delay": 0.2, "max_auth_failures": 3},
            "listener": [{"address": "127.0.0.1:2525", "tls": "implicit"}],
        }
    )
    with smtplib.SMTP_SSL("127.0.0.1", d.port, context=client_tls()) as c:
        c.ehlo("x")
        t0 = time.monotonic()
        codes = []
        for _ in range(3):
            code, _ = c.docmd("AUTH", "PLAIN " + base64.b64encode(b"\0alice\0bad").decode())
            codes.append(code)
        assert codes == [535, 535, 421]
        assert time.monotonic() - t0 >= 0.2 + 0.4 + 0.8 - 0.05  # 0.2, 0.4, 0.8 s


def raw(port, data: bytes, wait=0.3, read_greeting=True, source="127.0.0.1") -> bytes:
    s = socket.create_connection(("127.0.0.1", port), source_address=(source, 0))
    s.settimeout(wait)
    out = b""
    if read_greeting:
        out = s.recv(4096)
    s.sendall(data)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            chunk = s.recv(65536)
        except TimeoutError:
            break
        if not chunk:
            break
        out += chunk
    s.close()
    return out


SMUGGLING = [b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\r", b"\r.\r\n", b"\r\n\x00.\r\n"]


def at_data(port: int) -> socket.socket:
    """A raw client that said EHLO and MAIL/RCPT/DATA (pipelined) and got the 354."""
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(3)
    s.recv(1000)
    s.sendall(b"EHLO x\r\n")
    time.sleep(0.05)
    s.recv(1000)
    s.sendall(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n")
    time.sleep(0.1)
    assert s.recv(1000).endswith(b"354 End data with <CR><LF>.<CR><LF>\r\n")
    return s


@pytest.mark.parametrize("seq", SMUGGLING, ids=[repr(s) for s in SMUGGLING])
@pytest.mark.parametrize("mode", ["reject", "normalize"])
def test_smuggling_over_the_wire(smtpd, seq, mode):
    d = smtpd({"listener": [{"address": "127.0.0.1:2525", "bare_newline": mode}]})
    s = at_data(d.port)
    s.sendall(
        b"Subject: x\r\n\r\nbody"
        + seq
        + b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<v@d.test>\r\nDATA\r\nsmuggled\r\n.\r\n"
    )
    time.sleep(0.3)
    try:
        out = s.recv(4000)
    except (TimeoutError, ConnectionResetError):
        out = b""
    s.close()
    smuggled_accepted = any(m.envelope.sender == "evil@x.test" for m in d.submitted)
    assert not smuggled_accepted
    if seq == b"\r\n\x00.\r\n":
        # read to the real end of data (the final CRLF.CRLF), then refused: nothing stored
        assert out.startswith(b"554 5.6.0 ") and not d.submitted
        return
    bare_cr = b"\r" in seq.replace(b"\r\n", b"")
    if mode == "reject" or bare_cr:
        assert out.startswith(b"521 5.5.2") and not d.submitted
    else:
        # normalized: everything up to the real CRLF.CRLF is one message, smuggled text included
        assert out.startswith(b"250 ") and len(d.submitted) == 1
        stored = d.call(lambda: d.spool.read(d.submitted[0]))
        assert (
            b"MAIL FROM:<evil@x.test>" in stored
            and b"\r\n..\r\n" in stored
            or b"\r\n.\r\n" not in stored
        )


def test_pipelined_group_with_smuggling_in_reject_mode(smtpd):
    d = smtpd()
    s = socket.create_connection(("127.0.0.1", d.port))
    s.settimeout(3)
    s.recv(1000)
    s.sendall(b"EHLO x\r\n")
    time.sleep(0.05)
    s.recv(1000)
    s.sendall(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nRCPT TO:<e@d.test>\r\nDATA\r\n")
    time.sleep(0.1)
    assert (
        s.recv(1000)
        == b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n"
    )
    s.sendall(b"x\r\n.\r\n")
    time.sleep(0.1)
    assert s.recv(1000).startswith(b"250 2.0.0 Ok: queued as ")
    s.close()


def test_commands_pipelined_behind_a_message_wait_for_its_store(smtpd):
    """The next transaction arrives while the spool is still storing the first message:
    the listener holds it (reading paused) and answers in order once the 250 is out."""
    d = smtpd()
    real = d.spool.start_store

    def slow(env, data):
        inner = real(env, data)
        loop = asyncio.get_running_loop()
        outer = loop.create_future()
        inner.add_done_callback(lambda f: loop.call_later(0.2, outer.set_result, f.result()))
        return outer

    d.spool.start_store = slow
    s = at_data(d.port)
    s.sendall(b"one\r\n.\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<e@d.test>\r\nDATA\r\n")
    got = b""
    deadline = time.monotonic() + 3
    while not got.endswith(b"354 End data with <CR><LF>.<CR><LF>\r\n"):
        assert time.monotonic() < deadline, got
        got += s.recv(1000)
    lines = got.split(b"\r\n")
    assert lines[0].startswith(b"250 2.0.0 Ok: queued as ") and lines[1:4] == [
        b"250 2.1.0 Ok",
        b"250 2.1.5 Ok",
        b"354 End data with <CR><LF>.<CR><LF>",
    ]
    s.sendall(b"two\r\n.\r\nQUIT\r\n")
    got = b""
    while not got.endswith(b"221 2.0.0 Bye\r\n"):
        assert time.monotonic() < deadline, got
        got += s.recv(1000)
    assert got.startswith(b"250 2.0.0 Ok: queued as ")
    s.close()
    assert [sm.envelope.recipients[0].address for sm in d.submitted] == ["c@d.test", "e@d.test"]


def test_client_talking_before_the_greeting_is_refused(smtpd):
    d = smtpd({"limits": {"greet_pause": 0.3}})
    out = raw(d.port, b"EHLO early\r\n", wait=1.0, read_greeting=False)
    assert out == b"554 5.5.0 Error: SMTP protocol synchronization\r\n"
    # a patient client is greeted after the pause
    s = socket.create_connection(("127.0.0.1", d.port))
    s.settimeout(3)
    t0 = time.monotonic()
    assert s.recv(100).startswith(b"220 ") and time.monotonic() - t0 >= 0.25
    s.close()


def test_content_before_354_is_refused(smtpd):
    d = smtpd()
    # content sent before 354 in the same packet as DATA
    out = raw(d.port, b"EHLO x\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\nx\r\n.\r\n")
    assert b"554 5.5.0 Error: SMTP protocol synchronization" in out
    assert not d.submitted


def test_connection_limits(smtpd):
    d = smtpd({"limits": {"max_connections_per_ip": 2}})
    a = socket.create_connection(("127.0.0.1", d.port))
    b = socket.create_connection(("127.0.0.1", d.port))
    assert a.recv(100).startswith(b"220") and b.recv(100).startswith(b"220")
    c = socket.create_connection(("127.0.0.1", d.port))
    c.settimeout(3)
    assert c.recv(100).startswith(b"421 4.7.0")
    # another address is not counted against this one
    e = socket.create_connection(("127.0.0.1", d.port), source_address=("127.0.0.3", 0))
    assert e.recv(100).startswith(b"220")
    for s in (a, b, c, e):
        s.close()


def test_command_timeout(smtpd):
    d = smtpd({"limits": {"command_timeout": 0.3}})
    s = socket.create_connection(("127.0.0.1", d.port))
    s.settimeout(3)
    s.recv(100)
    t0 = time.monotonic()
    out = s.recv(100)
    assert out.startswith(b"421 4.4.2") and 0.25 < time.monotonic() - t0 < 2.5
    assert s.recv(100) == b""


def test_spool_failure_answers_452_and_server_keeps_running(smtpd):
    d = smtpd()
    real = d.spool.start_store
    calls = {"n": 0}

    def failing(env, data):
        calls["n"] += 1
        if calls["n"] == 1:  # the writer thread's failure, as it reaches the listener
            fut = asyncio.get_running_loop().create_future()
            fut.set_exception(SpoolError("No space left on device", 28))
            return fut
        if calls["n"] == 2:  # the spool refuses at once (closing)
            raise SpoolError("spool is not open")
        return real(env, data)

    d.spool.start_store = failing
    with smtplib.SMTP("127.0.0.1", d.port) as c:
        c.ehlo("x")
        c.mail("a@b.test")
        c.rcpt("c@d.test")
        code, text = c.data(MSG)
        assert (code, text) == (452, b"4.3.1 Insufficient system storage")
        c.mail("a@b.test")
        c.rcpt("c@d.test")
        assert c.data(MSG)[0] == 452
        assert c.sendmail("a@b.test", ["c@d.test"], MSG) == {}
    assert len(d.submitted) == 1


def test_message_too_big(smtpd):
    d = smtpd({"limits": {"max_message_size": "64k"}})
    with smtplib.SMTP("127.0.0.1", d.port) as c:
        c.ehlo("x")
        with pytest.raises(smtplib.SMTPSenderRefused) as e:
            c.sendmail("a@b.test", ["c@d.test"], b"x" * 70000)
        assert e.value.smtp_code == 552  # smtplib sends SIZE=, refused at MAIL
        c.rset()
        c.mail("a@b.test")  # without SIZE: refused after the content
        c.rcpt("c@d.test")
        code, _ = c.data(b"y" * 900 + b"\r\n" + b"z" * 70000)
        assert code in (500, 552)
    assert not d.submitted


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks not installed")
def test_swaks_pipelining(smtpd):
    d = smtpd()
    p = subprocess.run(
        [
            "swaks",
            "--server",
            f"127.0.0.1:{d.port}",
            "--from",
            "a@b.test",
            "--to",
            "c@d.test,e@d.test",
            "--pipeline",
            "--header",
            "Subject: swaks",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert "queued as" in p.stdout
    assert [r.address for r in d.submitted[0].envelope.recipients] == ["c@d.test", "e@d.test"]


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks not installed")
def test_swaks_starttls_auth(smtpd, tls_files):
    cert, key, users = tls_files
    d = smtpd(
        {
            "tls": {"cert_file": cert, "key_file": key},
            "policy": {"users_file": users},
            "listener": [{"address": "127.0.0.1:2525", "role": "submission", "tls": "starttls"}],
        }
    )
    p = subprocess.run(
        [
            "swaks",
            "--server",
            f"127.0.0.1:{d.port}",
            "--from",
            "alice@b.test",
            "--to",
            "c@d.test",
            "--tls",
            "--auth",
            "PLAIN",
            "--auth-user",
            "alice",
            "--auth-password",
            "s3cret",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert d.submitted and d.submitted[0].envelope.auth == "alice"


@pytest.mark.skipif(
    shutil.which("smtp-source") is None, reason="Postfix's smtp-source not installed"
)
def test_smtp_source_load(smtpd):
    """Postfix's load generator: 20 sessions, 400 messages; every one is spooled once."""
    d = smtpd()
    p = subprocess.run(
        [
            "smtp-source",
            "-s",
            "20",
            "-m",
            "400",
            "-l",
            "1024",
            "-f",
            "a@b.test",
            "-t",
            "c@d.test",
            f"127.0.0.1:{d.port}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    assert len(d.submitted) == 400
    assert len({m.envelope.id for m in d.submitted}) == 400


def test_mail_loop_is_refused_by_received_count(smtpd):
    """RFC 5321 6.3: a message that already has more Received: fields than limits.max_hops is
    going round a loop: 554 5.4.6, not queued; one field fewer is accepted."""
    d = smtpd({"limits": {"max_hops": 5}})
    trace = b"".join(b"Received: from h%d by h%d; Mon, 1 Jan 2026 00:00:00 +0000\r\n" % (i, i)
                     for i in range(5))  # fmt: skip
    body = b"Received:" + b" x" * 5 + b"\r\n\r\nReceived: in the body does not count\r\n"
    with smtplib.SMTP("127.0.0.1", d.port, timeout=10) as c:
        assert c.sendmail("a@b.test", ["c@d.test"], trace + MSG) == {}
        with pytest.raises(smtplib.SMTPDataError) as e:
            c.sendmail("a@b.test", ["c@d.test"], trace + body)
        assert (e.value.smtp_code, e.value.smtp_error[:5]) == (554, b"5.4.6")
        assert b"6 Received: header fields" in e.value.smtp_error
        assert c.noop()[0] == 250  # the session goes on
    assert len(d.submitted) == 1
