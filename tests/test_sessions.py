"""The sans-IO sessions: the server session driven by raw bytes, and the client session
talking to the server session in memory (no sockets at all)."""

from __future__ import annotations

import base64

import pytest

from fastmta.protocol import server as S
from fastmta.protocol.client import (
    ClientSession,
    Failed,
    Message,
    Ready,
    StartTLS,
    TransactionResult,
)
from fastmta.protocol.parse import dot_stuff
from fastmta.protocol.replies import reply


class Peer:
    """Answers server-session events: accepts everything unless told otherwise."""

    def __init__(self, config: S.SessionConfig | None = None, **policy):
        self.s = S.ServerSession(config or S.SessionConfig(hostname="mx.test"))
        self.s.greet()
        self.messages: list[S.MessageEvent] = []
        self.closed = False
        self.reject_rcpt = policy.get("reject_rcpt", lambda a: None)
        self.reject_mail = policy.get("reject_mail", lambda a: None)
        self.tls_started = 0

    def feed(self, data: bytes) -> bytes:
        self.s.receive(data)
        while (ev := self.s.next_event()) is not None:
            if isinstance(ev, S.MailEvent):
                r = self.reject_mail(ev.mail.address)
                self.s.reject(r) if r else self.s.accept()
            elif isinstance(ev, S.RcptEvent):
                r = self.reject_rcpt(ev.rcpt.address)
                self.s.reject(r) if r else self.s.accept()
            elif isinstance(ev, S.MessageEvent):
                self.messages.append(ev)
                self.s.accept(reply(250, "2.0.0", f"Ok: queued as Q{len(self.messages)}"))
            elif isinstance(ev, S.StartTLSEvent):
                self.tls_started += 1
                self.s.tls_started()
            elif isinstance(ev, S.AuthEvent):
                if ev.initial:  # PLAIN with an initial response (RFC 4954 4)
                    self.s.auth_success(base64.b64decode(ev.initial).split(b"\0")[1].decode())
                else:
                    self.s.challenge(b"")
            elif isinstance(ev, S.AuthResponseEvent):
                if ev.line == b"*":
                    self.s.reject(reply(501, "5.7.0", "Authentication aborted"))
                else:
                    user = base64.b64decode(ev.line).split(b"\0")[1].decode()
                    self.s.auth_success(user)
            elif isinstance(ev, S.CloseEvent):
                self.closed = True
                break
        return self.s.data_to_send()

    def greeting(self) -> bytes:
        return self.s.data_to_send()


def talk(peer: Peer, lines: bytes) -> list[bytes]:
    """Send lines; a leading EHLO goes alone first, as a client waits for its reply."""
    out = b""
    if lines.startswith(b"EHLO c\r\n") and len(lines) > 8:
        out = peer.feed(lines[:8])
        lines = lines[8:]
    out += peer.feed(lines)
    return out.splitlines()


# ------------------------------------------------------------------ server session


def test_basic_transaction_with_pipelining():
    p = Peer()
    assert p.greeting().startswith(b"220 mx.test")
    out = talk(p, b"EHLO c.test\r\n")
    assert out[0] == b"250-mx.test" and b"250-PIPELINING" in out and out[-1] == b"250 CHUNKING"
    out = talk(
        p,
        b"MAIL FROM:<a@b.test> SIZE=100\r\nRCPT TO:<c@d.test>\r\nRCPT TO:<e@d.test>\r\nDATA\r\n",
    )
    assert out == [
        b"250 2.1.0 Ok",
        b"250 2.1.5 Ok",
        b"250 2.1.5 Ok",
        b"354 End data with <CR><LF>.<CR><LF>",
    ]
    out = talk(p, b"Subject: hi\r\n\r\n..dot\r\n.\r\nQUIT\r\n")
    assert out == [b"250 2.0.0 Ok: queued as Q1", b"221 2.0.0 Bye"]
    (m,) = p.messages
    assert b"".join(m.chunks) == b"Subject: hi\r\n\r\n..dot\r\n"  # wire form kept
    assert [r.address for r in m.rcpts] == ["c@d.test", "e@d.test"] and m.mail.size == 100
    assert p.closed


@pytest.mark.parametrize(
    "commands, expected",
    [
        (b"MAIL FROM:<a@b.test>\r\n", b"503 5.5.1 Error: send HELO/EHLO first"),
        (b"EHLO c\r\nRCPT TO:<a@b.test>\r\n", b"503 5.5.1 Error: need MAIL command"),
        (b"EHLO c\r\nDATA\r\n", b"503 5.5.1 Error: need MAIL command"),
        (
            b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nMAIL FROM:<a@b.test>\r\n",
            b"503 5.5.1 Error: nested MAIL command",
        ),
        (b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nDATA\r\n", b"554 5.5.1 Error: no valid recipients"),
        (b"EHLO c\r\nFOO\r\n", b"500 5.5.2 Error: command not recognized"),
        (b"EHLO c\r\nEXPN x\r\n", b"502 5.5.1 Error: command not implemented"),
        (
            b"EHLO c\r\nVRFY x\r\n",
            b"252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery",
        ),
        (b"EHLO c\r\nMAIL FROM:<a@b.test> FOO=1\r\n", b"555 5.5.4 Unsupported option: FOO"),
        (b"EHLO c\r\nMAIL FROM:<bad\r\n", b"501 5.1.7 Bad sender address syntax"),
        (b"EHLO\r\n", b"501 5.5.4 Syntax: EHLO hostname"),
        (
            b"EHLO c\r\nMAIL FROM:<a@b.test> SIZE=999999999999\r\n",
            b"552 5.3.4 Message size exceeds fixed limit",
        ),
        (b"EHLO c\r\nSTARTTLS\r\n", b"502 5.5.1 Error: command not implemented"),
        (b"EHLO c\r\nAUTH PLAIN\r\n", b"504 5.5.4 Unrecognized authentication type"),
        (b"EHLO c\r\nNOOP\r\n", b"250 2.0.0 Ok"),
        (b"EHLO c\r\nRSET\r\n", b"250 2.0.0 Ok"),
        (b"EHLO c\r\nHELP\r\n", b"214 2.0.0 See https://www.rfc-editor.org/rfc/rfc5321"),
    ],
)
def test_replies_for_wrong_sequences_and_syntax(commands, expected):
    p = Peer(S.SessionConfig(hostname="mx.test", auth="never"))
    p.greeting()
    out = talk(p, commands)
    assert out[-1] == expected


def test_helo_client_must_not_pipeline():
    p = Peer()
    p.greeting()
    assert talk(p, b"HELO c\r\n") == [b"250 mx.test"]
    out = talk(p, b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\n")
    assert out == [b"554 5.5.0 Error: SMTP protocol synchronization"] and p.closed


def test_commands_pipelined_behind_ehlo_are_refused():
    for verb in (b"HELO", b"EHLO"):
        p = Peer()
        p.greeting()
        out = p.feed(verb + b" c\r\nMAIL FROM:<a@b.test>\r\n").splitlines()
        assert out == [b"554 5.5.0 Error: SMTP protocol synchronization"] and p.closed


def test_input_before_greeting_is_refused():
    s = S.ServerSession(S.SessionConfig())
    s.receive(b"EHLO early\r\n")
    assert s.data_to_send() == b"554 5.5.0 Error: SMTP protocol synchronization\r\n"
    assert isinstance(s.next_event(), S.CloseEvent)


def test_content_before_354_is_refused():
    p = Peer()
    p.greeting()
    out = talk(
        p,
        b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\nSubject: x\r\n\r\n.\r\n",
    )
    assert out[-1] == b"554 5.5.0 Error: SMTP protocol synchronization" and p.closed
    assert not p.messages


def test_content_before_354_allowed_when_not_forbidden():
    p = Peer(S.SessionConfig(forbid_unauth_pipelining=False))
    p.greeting()
    out = talk(p, b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\nx\r\n.\r\n")
    assert out[-1].startswith(b"250 2.0.0 Ok: queued")


def test_pipelined_after_failed_rcpt_and_data():
    """RFC 2920: replies in order; DATA after only failed RCPTs gets 554 and the content
    the client then (wrongly) sends is read as commands and fails harmlessly."""
    p = Peer(
        reject_rcpt=lambda a: reply(550, "5.1.1", "no such user") if a.startswith("x") else None
    )
    p.greeting()
    talk(p, b"EHLO c\r\n")
    out = talk(p, b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@d.test>\r\nRCPT TO:<y@d.test>\r\nDATA\r\n")
    assert out == [
        b"250 2.1.0 Ok",
        b"550 5.1.1 no such user",
        b"250 2.1.5 Ok",
        b"354 End data with <CR><LF>.<CR><LF>",
    ]
    talk(p, b"body\r\n.\r\n")
    assert [r.address for r in p.messages[0].rcpts] == ["y@d.test"]


def test_too_many_recipients():
    p = Peer(S.SessionConfig(max_recipients=100))
    p.greeting()
    talk(p, b"EHLO c\r\nMAIL FROM:<a@b.test>\r\n")
    out = talk(p, b"".join(b"RCPT TO:<r%d@d.test>\r\n" % i for i in range(101)))
    assert out[-1] == b"452 4.5.3 Error: too many recipients" and out[-2] == b"250 2.1.5 Ok"


def test_message_too_big_and_line_too_long():
    p = Peer(S.SessionConfig(max_message_size=100))
    p.greeting()
    talk(p, b"EHLO c\r\n")
    talk(p, b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n")
    out = talk(p, b"x" * 60 + b"\r\n" + b"y" * 60 + b"\r\n.\r\n")
    assert out == [b"552 5.3.4 Error: message file too big"] and not p.messages
    talk(p, b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n")
    assert talk(p, b"ok\r\n.\r\n")[0].startswith(b"250")
    p2 = Peer()
    p2.greeting()
    talk(p2, b"EHLO c\r\n")
    talk(p2, b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n")
    assert talk(p2, b"z" * 2000 + b"\r\n.\r\n") == [b"500 5.5.2 Error: message line too long"]


@pytest.mark.parametrize("seq", [b"\n.\n", b"\r.\r\n", b"\n.\r\n", b"\r\n.\r"])
def test_smuggling_in_session(seq):
    for mode in ("reject", "normalize"):
        p = Peer(S.SessionConfig(bare_newline=mode))
        p.greeting()
        talk(p, b"EHLO c\r\n")
        talk(p, b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n")
        out = talk(p, b"body" + seq + b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<v@d.test>\r\nDATA\r\n")
        # never a second transaction from the smuggled commands
        assert all(b"354" not in line for line in out)
        if mode == "reject" or b"\r" in seq.replace(b"\r\n", b""):
            assert out[-1].startswith(b"521 5.5.2") and p.closed
        else:
            assert out == []  # still content
            assert talk(p, b".\r\n")[0].startswith(b"250")
            assert b"MAIL FROM:<evil@x.test>" in b"".join(p.messages[0].chunks)


def test_bdat_chunks():
    p = Peer()
    p.greeting()
    talk(p, b"EHLO c\r\n")
    content = b"Subject: x\r\n\r\n.dot\r\n"
    out = talk(
        p,
        b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nBDAT 10\r\n"
        + content[:10]
        + b"BDAT %d LAST\r\n" % (len(content) - 10)
        + content[10:]
        + b"QUIT\r\n",
    )
    assert out[2] == b"250 2.0.0 Ok: 10 octets" and out[3].startswith(b"250 2.0.0 Ok: queued")
    assert b"".join(p.messages[0].chunks) == b"Subject: x\r\n\r\n..dot\r\n"  # stuffed for the spool


def test_bdat_every_split_and_octets_without_stuffing():
    """A BDAT transaction split anywhere is the same conversation; the octets a chunk reply
    counts are the client's (RFC 3030), not the stuffed form kept for the spool."""
    chunk1 = b".dot\r\nline"
    chunk2 = b" two\r\n"
    stream = (
        b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nBDAT %d\r\n" % len(chunk1)
        + chunk1
        + b"BDAT %d LAST\r\n" % len(chunk2)
        + chunk2
        + b"NOOP\r\n"
    )
    want = [
        b"250 2.1.0 Ok",
        b"250 2.1.5 Ok",
        b"250 2.0.0 Ok: 10 octets",
        b"250 2.0.0 Ok: queued as Q1",
        b"250 2.0.0 Ok",
    ]
    for k in range(len(stream) + 1):
        p = Peer()
        p.greeting()
        p.feed(b"EHLO c\r\n")
        got = p.feed(stream[:k]) + p.feed(stream[k:])
        assert got.splitlines() == want, k
        assert b"".join(p.messages[0].chunks) == b"..dot\r\nline two\r\n"


def test_data_after_bdat_is_bad_sequence():
    """RFC 3030 2: DATA after BDAT in one transaction gets 503; the chunk already sent is not
    dropped for a new body, and BDAT LAST still completes the message."""
    p = Peer()
    p.greeting()
    talk(p, b"EHLO c\r\n")
    out = talk(p, b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nBDAT 7\r\nhello\r\nDATA\r\n")
    assert out[-2:] == [b"250 2.0.0 Ok: 7 octets", b"503 5.5.1 Error: bad sequence of commands"]
    assert talk(p, b"BDAT 7 LAST\r\nworld\r\n")[0].startswith(b"250 2.0.0 Ok: queued")
    assert b"".join(p.messages[0].chunks) == b"hello\r\nworld\r\n"


@pytest.mark.parametrize("content", [b"a\r\n\x00.\r\nMAIL FROM:<evil@x.test>\r\n", b"a\x00b\r\n"])
def test_nul_in_content_is_refused_and_the_session_goes_on(content):
    """A NUL is read to the real end of data and the message refused with 554 5.6.0 (never
    stored, never ending data); the connection carries on."""
    for mode in ("reject", "normalize"):
        p = Peer(S.SessionConfig(bare_newline=mode))
        p.greeting()
        talk(p, b"EHLO c\r\n")
        talk(p, b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n")
        out = talk(p, content + b"more\r\n.\r\nNOOP\r\n")
        assert out == [b"554 5.6.0 Error: NUL character in message content", b"250 2.0.0 Ok"]
        assert not p.messages and not p.closed
        out = talk(
            p,
            b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nBDAT %d LAST\r\n" % len(content)
            + content,
        )
        assert out[-1] == b"554 5.6.0 Error: NUL character in message content"
        assert not p.messages and talk(p, b"NOOP\r\n") == [b"250 2.0.0 Ok"]


def test_command_line_limit_in_session():
    p = Peer()
    p.greeting()
    talk(p, b"EHLO c\r\n")
    assert talk(p, b"NOOP " + b"x" * 505 + b"\r\n") == [b"250 2.0.0 Ok"]  # 512 with CRLF
    assert talk(p, b"NOOP " + b"x" * 506 + b"\r\nNOOP\r\n") == [
        b"500 5.5.2 Line too long",
        b"250 2.0.0 Ok",
    ]


def test_auth_response_lines_have_their_own_limit():
    """RFC 4954 4: a SASL response may be longer than a command (max_auth_line); one over
    that fails the exchange with 500 5.5.6 and the next line is a command again."""
    cfg = S.SessionConfig(auth="always", max_auth_line=2048)
    p = Peer(cfg)
    p.greeting()
    talk(p, b"EHLO c\r\n")
    assert talk(p, b"AUTH PLAIN\r\n") == [b"334 "]
    response = base64.b64encode(b"\0alice\0" + b"p" * 700)  # 940 octets: over 512
    assert talk(p, response + b"\r\n") == [b"235 2.7.0 Authentication successful"]
    p = Peer(cfg)
    p.greeting()
    talk(p, b"EHLO c\r\n")
    assert talk(p, b"AUTH PLAIN\r\n") == [b"334 "]
    out = talk(p, b"A" * 3000 + b"\r\nNOOP " + b"x" * 600 + b"\r\nQUIT\r\n")
    assert out == [
        b"500 5.5.6 Authentication Exchange line is too long",
        b"500 5.5.2 Line too long",  # commands have their 512 again
        b"221 2.0.0 Bye",
    ]
    assert p.s.user is None and p.closed


def test_sans_io_sessions_import_no_io():
    """The sessions are sans-IO: importing them pulls in no event loop, sockets or TLS."""
    import subprocess
    import sys

    code = (
        "import sys, fastmta.protocol.server, fastmta.protocol.client\n"
        "print(sorted(m for m in ('asyncio', 'socket', 'ssl', 'selectors', 'uvloop')"
        " if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_dsn_not_offered_refuses_its_parameters():
    p = Peer(S.SessionConfig(dsn=False))
    p.greeting()
    assert b"250-DSN" not in b"\n".join(talk(p, b"EHLO c\r\n"))
    assert talk(p, b"MAIL FROM:<a@b.test> RET=HDRS\r\n") == [
        b"555 5.5.4 Error: DSN parameters not supported"
    ]
    assert talk(p, b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test> NOTIFY=NEVER\r\n") == [
        b"250 2.1.0 Ok",
        b"555 5.5.4 Error: DSN parameters not supported",
    ]


def test_bdat_without_rcpt_consumes_chunk():
    p = Peer()
    p.greeting()
    talk(p, b"EHLO c\r\n")
    out = talk(p, b"MAIL FROM:<a@b.test>\r\nBDAT 6 LAST\r\nQUIT\r\nNOOP\r\n")
    assert out == [b"250 2.1.0 Ok", b"554 5.5.1 Error: no valid recipients", b"250 2.0.0 Ok"]


def test_starttls_then_state_is_reset_and_injection_refused():
    p = Peer(S.SessionConfig(tls_available=True))
    p.greeting()
    out = talk(p, b"EHLO c\r\n")
    assert b"250-STARTTLS" in out and not any(b"AUTH" in x for x in out)
    assert talk(p, b"STARTTLS\r\n") == [b"220 2.0.0 Ready to start TLS"]
    assert p.tls_started == 1 and p.s.tls and p.s.helo is None
    assert talk(p, b"MAIL FROM:<a@b.test>\r\n") == [b"503 5.5.1 Error: send HELO/EHLO first"]
    out = talk(p, b"EHLO c\r\n")
    assert b"250-STARTTLS" not in out and b"250-AUTH PLAIN LOGIN" in out
    p2 = Peer(S.SessionConfig(tls_available=True))
    p2.greeting()
    talk(p2, b"EHLO c\r\n")
    out = talk(p2, b"STARTTLS\r\nMAIL FROM:<injected@x.test>\r\n")
    assert out == [b"554 5.5.0 Error: SMTP protocol synchronization"] and p2.tls_started == 0


def test_auth_exchange_and_required():
    p = Peer(S.SessionConfig(auth="always", auth_required=True))
    p.greeting()
    talk(p, b"EHLO c\r\n")
    assert talk(p, b"MAIL FROM:<a@b.test>\r\n") == [b"530 5.7.0 Authentication required"]
    assert talk(p, b"AUTH PLAIN\r\n") == [b"334 "]
    assert talk(p, base64.b64encode(b"\0alice\0pw") + b"\r\n") == [
        b"235 2.7.0 Authentication successful"
    ]
    assert p.s.user == "alice"
    assert talk(p, b"MAIL FROM:<a@b.test>\r\n") == [b"250 2.1.0 Ok"]
    assert talk(p, b"AUTH PLAIN\r\n") == [b"503 5.5.1 Error: already authenticated"]


def test_auth_needs_tls_by_default():
    p = Peer(S.SessionConfig())
    p.greeting()
    talk(p, b"EHLO c\r\n")
    assert talk(p, b"AUTH PLAIN AHgAeQ==\r\n") == [
        b"538 5.7.11 Encryption required for requested authentication mechanism"
    ]


def test_too_many_errors_disconnects():
    p = Peer(S.SessionConfig(max_errors=3))
    p.greeting()
    out = talk(p, b"EHLO c\r\nFOO\r\nBAR\r\nBAZ\r\nNOOP\r\n")
    assert out[-1] == b"421 4.7.0 Error: too many errors" and p.closed


def test_non_smtp_client_is_dropped():
    p = Peer()
    p.greeting()
    assert talk(p, b"GET / HTTP/1.1\r\n")[0].startswith(b"221 2.7.0") and p.closed


def test_every_split_gives_the_same_conversation():
    stream = (
        b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n",
        b"Subject: x\r\n\r\nhello\r\n.\r\nQUIT\r\n",
    )
    whole = Peer()
    whole.greeting()
    whole.feed(b"EHLO c\r\n")
    want = whole.feed(stream[0]) + whole.feed(stream[1])
    for part in range(2):
        data = stream[part]
        for k in range(1, len(data)):
            p = Peer()
            p.greeting()
            p.feed(b"EHLO c\r\n")
            got = p.feed(stream[0]) if part == 1 else b""
            pieces = [data[:k], data[k:]]
            for piece in pieces:
                got += p.feed(piece)
            if part == 0:
                got += p.feed(stream[1])
            assert got == want
            assert b"".join(p.messages[0].chunks) == b"Subject: x\r\n\r\nhello\r\n"


# ------------------------------------------------------------------ client <-> server in memory


def converse(client: ClientSession, peer: Peer, greeting: bytes, on_ready=None, max_rounds=100):
    """Shuttle bytes between the two sessions until the client has nothing to say."""
    events = []
    client.receive(greeting)
    for _ in range(max_rounds):
        while (ev := client.next_event()) is not None:
            events.append(ev)
            if isinstance(ev, StartTLS):
                client.tls_started()
            elif on_ready is not None:
                on_ready(ev)
        out = client.data_to_send()
        if not out:
            break
        back = peer.feed(out)
        if back:
            client.receive(back)
    return events


def run_client(peer: Peer, msgs: list[Message], *, starttls=False, **kw):
    client = ClientSession("client.test", **kw)
    todo = list(msgs)
    results = []

    def on_ready(ev):
        if isinstance(ev, Ready):
            if starttls and ev.capabilities.starttls and not ev.tls:
                client.starttls()
                return
            if todo:
                client.send(todo.pop(0))
            else:
                client.quit()
        elif isinstance(ev, TransactionResult):
            results.append(ev)
            if todo:
                client.send(todo.pop(0))
            else:
                client.quit()

    events = converse(client, peer, peer.greeting(), on_ready)
    return client, events, results


BODY = dot_stuff(b"Subject: hello\r\n\r\n.leading dot\r\nbody\r\n", terminate=False)


@pytest.mark.parametrize("pipelining", [True, False])
@pytest.mark.parametrize("chunking", [True, False])
def test_client_and_server_in_memory(pipelining, chunking):
    peer = Peer(
        reject_rcpt=lambda a: reply(550, "5.1.1", "unknown") if a.startswith("bad") else None
    )
    msgs = [
        Message("a@b.test", ["c@d.test", "bad@d.test", "e@d.test"], BODY),
        Message("a@b.test", ["f@d.test"], BODY),
    ]
    client, events, results = run_client(
        peer, msgs, use_pipelining=pipelining, use_chunking=chunking
    )
    assert len(results) == 2
    r1 = results[0]
    assert [x.code for x in r1.rcpts] == [250, 550, 250] and r1.data.code == 250
    assert [x.code for x in results[1].rcpts] == [250]
    assert len(peer.messages) == 2
    assert b"".join(peer.messages[0].chunks) == BODY  # wire form survives both ways (DATA and BDAT)
    assert [r.address for r in peer.messages[0].rcpts] == ["c@d.test", "e@d.test"]
    assert peer.closed


def test_client_all_rcpts_rejected_then_next_transaction_works():
    peer = Peer(
        reject_rcpt=lambda a: reply(550, "5.1.1", "unknown") if a.startswith("bad") else None
    )
    msgs = [
        Message("a@b.test", ["bad1@d.test", "bad2@d.test"], BODY),
        Message("a@b.test", ["ok@d.test"], BODY),
    ]
    client, events, results = run_client(peer, msgs, use_chunking=False)
    assert [x.code for x in results[0].rcpts] == [550, 550] and results[0].data is None
    assert [x.code for x in results[1].rcpts] == [250]
    assert len(peer.messages) == 1


def test_client_mail_rejected():
    peer = Peer(reject_mail=lambda a: reply(553, "5.7.1", "sender refused"))
    client, events, results = run_client(peer, [Message("a@b.test", ["c@d.test"], BODY)])
    assert results[0].mail.code == 553 and [x.code for x in results[0].rcpts] == [553]


def test_client_falls_back_to_helo():
    class OldServer(Peer):
        def feed(self, data):
            if data.startswith(b"EHLO"):
                return b"502 5.5.2 Error: command not recognized\r\n"
            return super().feed(data)

    peer = OldServer()
    client, events, results = run_client(peer, [Message("a@b.test", ["c@d.test"], BODY)])
    assert not client.capabilities.pipelining and results[0].data.code == 250


def test_client_starttls_reissues_ehlo():
    peer = Peer(S.SessionConfig(tls_available=True))
    client, events, results = run_client(
        peer, [Message("a@b.test", ["c@d.test"], BODY)], starttls=True
    )
    assert peer.tls_started == 1 and client.tls
    assert sum(isinstance(e, Ready) for e in events) == 2
    assert results[0].data.code == 250


def test_client_smtputf8_needed_but_not_offered():
    client = ClientSession("c.test")
    client.receive(b"220 mx\r\n")
    client.receive(b"250-mx\r\n250 PIPELINING\r\n")
    assert isinstance(client.next_event(), Ready)
    client.send(Message("a@b.test", ["ü@d.test"], BODY, smtputf8=True))
    ev = client.next_event()
    assert (
        isinstance(ev, TransactionResult)
        and ev.rcpts[0].code == 553
        and ev.rcpts[0].enhanced == "5.6.7"
    )
    assert client.data_to_send() == b"EHLO c.test\r\n"  # nothing sent for that message


def test_client_closed_right_behind_ready_answers_the_next_send():
    """A server that sends 421 in the same packet as its EHLO reply: the caller saw Ready,
    and the message it then sends gets the 421 for every recipient, not an exception."""
    c = ClientSession("client.test")
    c.receive(b"220 mx.test\r\n")
    c.data_to_send()
    c.receive(b"250-mx.test\r\n250 PIPELINING\r\n421 4.3.2 shutting down\r\n")
    assert isinstance(c.next_event(), Ready)
    c.send(Message("a@b.test", ["c@d.test", "e@d.test"], b"x\r\n"))
    assert c.data_to_send() == b""
    failed = c.next_event()
    assert isinstance(failed, Failed) and failed.reply.code == 421
    result = c.next_event()
    assert isinstance(result, TransactionResult)
    assert [r.code for r in result.rcpts] == [421, 421] and result.mail.code == 421


@pytest.mark.parametrize("step", ["starttls", "authenticate", "quit"])
def test_client_closed_right_behind_ready_ignores_the_next_step(step):
    """Whatever the caller does on Ready (STARTTLS, AUTH, QUIT) after the server already
    closed: nothing is sent, no exception, and the queued Failed says why."""
    c = ClientSession("client.test")
    c.receive(b"220 mx.test\r\n")
    c.data_to_send()
    c.receive(b"250-mx.test\r\n250-STARTTLS\r\n250 AUTH PLAIN\r\n421 4.3.2 bye\r\n")
    assert isinstance(c.next_event(), Ready)
    getattr(c, step)(*(("u", "p") if step == "authenticate" else ()))
    if step == "starttls":
        c.tls_started()  # even a late handshake does not revive it
    assert c.data_to_send() == b""
    failed = c.next_event()
    assert isinstance(failed, Failed) and failed.reply.code == 421
    assert c.next_event() is None and c.phase.value == "closed"


def test_client_421_and_greeting_failures():
    client = ClientSession("c.test")
    client.receive(b"421 4.3.2 busy\r\n")
    ev = client.next_event()
    assert isinstance(ev, Failed) and ev.reply.code == 421
    client = ClientSession("c.test")
    client.receive(b"220 mx\r\n250 mx\r\n")
    client.next_event()
    client.send(Message("a@b.test", ["c@d.test"], BODY))
    client.receive(b"421 4.4.2 timeout\r\n")
    evs = [client.next_event(), client.next_event()]
    assert isinstance(evs[0], TransactionResult) and evs[0].rcpts[0].code == 421
    assert isinstance(evs[1], Failed)


@pytest.mark.parametrize(
    "replies, looped",
    [
        (b"220 Mx.Test. ESMTP ready\r\n", True),  # the greeting names us (case, root dot)
        (b"220 ESMTP\r\n250-MX.test hello\r\n250 PIPELINING\r\n", True),  # the EHLO reply
        (b"220 mx.test.example ESMTP\r\n250-mx.testing\r\n250 8BITMIME\r\n", False),
    ],
)
def test_client_detects_a_loop_back_to_itself(replies, looped):
    """An MX or route that leads back to this MTA: the server greets with the name we say in
    EHLO. Like Postfix ("mail for ... loops back to myself"): 550 5.4.6, the connection fails."""
    client = ClientSession("mx.test")
    client.receive(replies)
    ev = client.next_event()
    if looped:
        assert isinstance(ev, Failed) and (ev.reply.code, ev.reply.enhanced) == (550, "5.4.6")
        assert "loops back to myself" in ev.reply.text and client.phase.value == "closed"
    else:
        assert isinstance(ev, Ready)
    # a name that is not unique ("localhost", no dot) is never taken for ourselves
    for mine in ("localhost", "localhost.localdomain", "box"):
        client = ClientSession(mine)
        client.receive(f"220 {mine} ESMTP\r\n250 {mine}\r\n".encode())
        assert isinstance(client.next_event(), Ready)


def test_client_connection_lost_mid_data():
    client = ClientSession("c.test", use_chunking=False)
    client.receive(b"220 mx\r\n250-mx\r\n250 PIPELINING\r\n")
    client.next_event()
    client.send(Message("a@b.test", ["c@d.test"], BODY))
    client.receive(b"250 ok\r\n250 ok\r\n354 go\r\n")
    client.connection_lost()
    ev = client.next_event()
    assert isinstance(ev, TransactionResult) and ev.rcpts[0].is_transient()


def test_pipelining_and_smtputf8_can_be_withheld():
    p = Peer(S.SessionConfig(pipelining=False, smtputf8=False))
    p.greeting()
    out = talk(p, b"EHLO c\r\n")
    assert b"250-PIPELINING" not in out and not any(b"SMTPUTF8" in x for x in out)
    assert talk(p, "MAIL FROM:<jö@b.test> SMTPUTF8\r\n".encode()) == [
        b"555 5.5.4 Error: SMTPUTF8 not supported"
    ]
    out = talk(p, b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\n")
    assert out == [b"554 5.5.0 Error: SMTP protocol synchronization"] and p.closed


def test_client_auth_login_and_plain():
    from fastmta.protocol.client import Authenticated

    c = ClientSession("c.test")
    c.receive(b"220 mx\r\n250-mx\r\n250 AUTH LOGIN\r\n")
    c.data_to_send()
    assert isinstance(c.next_event(), Ready)
    c.authenticate("user", "pw")
    assert c.data_to_send() == b"AUTH LOGIN\r\n"
    c.receive(b"334 VXNlcm5hbWU6\r\n")
    assert c.data_to_send() == base64.b64encode(b"user") + b"\r\n"
    c.receive(b"334 UGFzc3dvcmQ6\r\n")
    assert c.data_to_send() == base64.b64encode(b"pw") + b"\r\n"
    c.receive(b"235 2.7.0 ok\r\n")
    assert isinstance(c.next_event(), Authenticated)

    c = ClientSession("c.test")
    c.receive(b"220 mx\r\n250-mx\r\n250 AUTH PLAIN LOGIN\r\n")
    c.data_to_send()
    c.next_event()
    c.authenticate("user", "pw")
    assert c.data_to_send() == b"AUTH PLAIN " + base64.b64encode(b"\0user\0pw") + b"\r\n"
    c.receive(b"535 5.7.8 bad credentials\r\n")
    ev = c.next_event()
    assert isinstance(ev, Failed) and ev.reply.code == 535


def test_client_auth_against_server_session():
    """PLAIN from the client session, checked by the server session (in memory)."""
    from fastmta.protocol.client import Authenticated

    peer = Peer(S.SessionConfig(auth="always"))
    client = ClientSession("client.test")
    seen = []

    def on_event(ev):
        seen.append(ev)
        if isinstance(ev, Ready):
            client.authenticate("alice", "pw")

    converse(client, peer, peer.greeting(), on_event)
    assert any(isinstance(e, Authenticated) for e in seen) and peer.s.user == "alice"


# ------------------------------------------------------------------ chained transactions


def _ready(
    caps: bytes = b"250-mx\r\n250-PIPELINING\r\n250 SIZE 1000000\r\n", **kw
) -> ClientSession:
    client = ClientSession("c.test", **kw)
    client.receive(b"220 mx\r\n" + caps)
    assert isinstance(client.next_event(), Ready)
    client.data_to_send()
    return client


def test_chained_transactions_against_server_session():
    """Each next message goes out with the previous one's final dot, in one write; the server
    session takes them all; results come one per message, in order."""
    peer = Peer(
        reject_rcpt=lambda a: reply(550, "5.1.1", "unknown") if a.startswith("bad") else None
    )
    client = ClientSession("client.test", use_chunking=False)
    msgs = [Message("a@b.test", [f"u{i}@d.test", "bad@d.test"], BODY) for i in range(4)]
    todo = list(msgs)
    results, writes = [], []

    def on_ready(ev):
        if isinstance(ev, Ready):
            client.send(todo.pop(0))
        elif isinstance(ev, TransactionResult):
            results.append(ev)
            if not todo and client.phase.value == "idle":
                client.quit()

    client.receive(peer.greeting())
    for _ in range(50):
        while (ev := client.next_event()) is not None:
            on_ready(ev)
        if todo and client.can_chain:
            client.send(todo.pop(0))
        out = client.data_to_send()
        if not out:
            break
        writes.append(out)
        back = peer.feed(out)
        if back:
            client.receive(back)
    assert len(results) == 4 and len(peer.messages) == 4
    assert all([x.code for x in r.rcpts] == [250, 550] for r in results)
    assert [m.rcpts[0].address for m in peer.messages] == [f"u{i}@d.test" for i in range(4)]
    # a chained write: the content, its ".", then the next MAIL/RCPT.../DATA
    chained = [w for w in writes if b".\r\nMAIL FROM:<a@b.test>" in w]
    assert len(chained) == 3 and all(w.endswith(b"DATA\r\n") for w in chained)
    assert not any(b"RSET" in w for w in writes) and peer.closed


def test_chain_only_after_content_went_out_with_data():
    m = Message("a@b.test", ["c@d.test"], BODY)
    client = _ready()
    assert not client.can_chain
    client.send(m)
    assert not client.can_chain  # waiting for the 354: the DATA must end the group
    with pytest.raises(RuntimeError):
        client.send(m)
    client.receive(b"250 ok\r\n250 ok\r\n354 go\r\n")
    assert client.can_chain
    # BDAT: a failed chunk leaves the server's transaction open, so never chained
    client = _ready(b"250-mx\r\n250-PIPELINING\r\n250 CHUNKING\r\n")
    client.send(m)
    assert not client.can_chain
    # without PIPELINING nothing is chained
    client = _ready(b"250-mx\r\n250 SIZE 1000000\r\n")
    client.send(m)
    client.receive(b"250 ok\r\n")
    client.receive(b"250 ok\r\n")
    client.receive(b"354 go\r\n")
    assert client.phase.value == "data_done" and not client.can_chain


def test_chained_after_failed_content_needs_no_rset():
    m1 = Message("a@b.test", ["c@d.test"], BODY)
    m2 = Message("a@b.test", ["e@d.test"], BODY)
    client = _ready()
    client.send(m1)
    client.data_to_send()
    client.receive(b"250 ok\r\n250 ok\r\n354 go\r\n")
    client.send(m2)
    out = client.data_to_send()
    assert out.startswith(BODY + b".\r\nMAIL FROM:<a@b.test>") and b"RSET" not in out
    client.receive(b"554 5.7.1 content rejected\r\n250 ok\r\n250 ok\r\n354 go\r\n")
    r1 = client.next_event()
    assert isinstance(r1, TransactionResult) and r1.rcpts[0].code == 554
    assert client.data_to_send() == BODY + b".\r\n"
    client.receive(b"250 queued\r\n")
    r2 = client.next_event()
    assert isinstance(r2, TransactionResult) and r2.rcpts[0].code == 250
    client.send(Message("a@b.test", ["f@d.test"], BODY))  # and still no RSET
    assert client.data_to_send().startswith(b"MAIL FROM:")


def test_chained_transaction_never_answered_gets_no_response():
    """421 after the first message's dot: it gets the 421; the chained one was never answered
    (NO_RESPONSE: the caller may send it over another connection)."""
    from fastmta.protocol.client import NO_RESPONSE

    m = Message("a@b.test", ["c@d.test", "e@d.test"], BODY)
    client = _ready()
    client.send(m)
    client.receive(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
    client.send(m)
    client.receive(b"421 4.3.2 shutting down\r\n")
    r1, r2, failed = client.next_event(), client.next_event(), client.next_event()
    assert [x.code for x in r1.rcpts] == [421, 421]
    assert r2.mail is NO_RESPONSE and r2.rcpts == [NO_RESPONSE, NO_RESPONSE]
    assert isinstance(failed, Failed) and client.phase.value == "closed"
    # a refused message (too big for this server) is never chained
    client = _ready()
    client.send(m)
    client.receive(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
    big = Message("a@b.test", ["c@d.test"], b"x" * 2_000_000)
    assert client.refusal(big) is not None
    with pytest.raises(RuntimeError):
        client.send(big)
