"""fastmta.cli: the command via subprocess (help, version, config, passwd, send into a spool,
placeholders), and the sendmail-style message preparation functions directly."""

from __future__ import annotations

import asyncio
import email
import email.policy
import importlib.util
import os
import subprocess
import sys

import pytest

from fastmta.auth import Users
from fastmta.cli import check_address, prepare_message, split_lines
from fastmta.protocol.parse import dot_stuff

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(
    *args: str, stdin: bytes = b"", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k not in ("FASTMTA_SPOOL", "XDG_STATE_HOME")}
    e["PYTHONPATH"] = ROOT
    e.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "fastmta.cli", *args],
        input=stdin, capture_output=True, env=e, timeout=30, cwd=ROOT,
    )  # fmt: skip


# --------------------------------------------------------------------------- help, version, config


def test_help_explains_every_command():
    r = run("--help")
    assert r.returncode == 0
    out = r.stdout.decode()
    assert "high-throughput outbound mail transfer agent" in out
    for command in ("serve", "send", "passwd", "config", "queue", "bench"):
        assert command in out
    for command in ("serve", "send", "passwd", "config", "queue", "bench"):
        r = run(command, "--help")
        assert r.returncode == 0 and b"usage: fastmta " + command.encode() in r.stdout


def test_version_names_the_compiled_modules():
    from fastmta.protocol.parse import ACCELERATED as parser
    from fastmta.spool.iothread import ACCELERATED as spool_io

    r = run("--version")
    assert r.returncode == 0
    if parser and spool_io:
        assert r.stdout.decode().strip() == "fastmta 0.1.0 (accelerated parser and spool I/O)"
    else:
        assert "pure Python" in r.stdout.decode()
    r = run("--version", env={"FASTMTA_NO_EXTENSIONS": "1"})
    assert r.stdout.decode().strip() == "fastmta 0.1.0 (pure Python parser and spool I/O)"


def test_config_example_and_check(tmp_path):
    r = run("config", "--example")
    assert r.returncode == 0 and b"[delivery]" in r.stdout
    example = tmp_path / "example.toml"
    example.write_bytes(r.stdout)
    r = run("config", "--check", str(example))
    assert (r.returncode, r.stdout.strip()) == (0, f"{example}: OK".encode())

    bad = tmp_path / "bad.toml"
    bad.write_text("[limits]\nmax_recipients = 10\n")
    r = run("config", "--check", str(bad))
    assert r.returncode == 2
    assert b"config error: limits.max_recipients: must be >= 100" in r.stderr

    r = run("config", "--check", str(tmp_path / "absent.toml"))
    assert r.returncode == 2 and b"config file not found" in r.stderr


def test_serve_config_errors_exit_2(tmp_path):
    r = run("serve", "--config", str(tmp_path / "absent.toml"))
    assert r.returncode == 2 and b"config file not found" in r.stderr
    r = run("serve", "--listen", "localhost:99999")
    assert r.returncode == 2 and b"config error: listener[0].address" in r.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('[[listener]]\nrole = "mx"\n')
    r = run("serve", "--config", str(bad))
    assert r.returncode == 2
    assert b'listener[0].role: expected "relay" or "submission", got "mx"' in r.stderr


# --------------------------------------------------------------------------- passwd


def test_passwd_then_verify(tmp_path):
    users = tmp_path / "users"
    r = run("passwd", "alice", "--file", str(users), stdin=b"s3cret pass\n")
    assert r.returncode == 0, r.stderr
    r = run("passwd", "bob", "--file", str(users), stdin=b"other\n")
    assert r.returncode == 0, r.stderr
    r = run("passwd", "alice", "--file", str(users), stdin=b"changed\n")
    assert r.returncode == 0, r.stderr
    assert oct(os.stat(users).st_mode & 0o777) == "0o600"
    u = Users(str(users))
    assert u.verify("alice", "changed") and not u.verify("alice", "s3cret pass")
    assert u.verify("bob", "other")


def test_passwd_errors(tmp_path):
    r = run("passwd", "alice", stdin=b"x\n")
    assert r.returncode == 2 and b"no users file" in r.stderr
    r = run("passwd", "al:ice", "--file", str(tmp_path / "u"), stdin=b"x\n")
    assert r.returncode == 64
    r = run("passwd", "alice", "--file", str(tmp_path / "u"), stdin=b"\n")
    assert r.returncode == 64 and b"empty password" in r.stderr
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[policy]\nusers_file = "{tmp_path / "from-config"}"\n')
    r = run("passwd", "carol", "--config", str(cfg), stdin=b"pw\n")
    assert r.returncode == 0 and Users(tmp_path / "from-config").verify("carol", "pw")


# --------------------------------------------------------------------------- message preparation


def test_split_lines_and_dot_stuff():
    assert split_lines(b"a\nb\r\nc\rd") == [b"a", b"b", b"c", b"d"]
    assert split_lines(b"a\n\n") == [b"a", b""]
    assert split_lines(b"") == []
    assert dot_stuff(b".\n..x\na.b\n\n", terminate=False) == b"..\r\n...x\r\na.b\r\n\r\n"
    assert dot_stuff(b"", terminate=False) == b""


def test_prepare_message_adds_headers_and_stuffs():
    data = b"Subject: hi\nTo: a@example.com\n\nline one\n.hidden\n.\nlast"
    wire, found = prepare_message(data, extract=False, hostname="h.example", sender="me@h.example")
    assert found == []
    assert b"\n" not in wire.replace(b"\r\n", b"")
    assert wire.endswith(b"\r\n") and not wire.endswith(b"\r\n.\r\n")
    head, body = wire.split(b"\r\n\r\n", 1)
    assert body == b"line one\r\n..hidden\r\n..\r\nlast\r\n"
    assert head.startswith(b"Subject: hi\r\nTo: a@example.com\r\nFrom: me@h.example\r\nDate: ")
    assert b"\r\nMessage-ID: <" in head and head.endswith(b"@h.example>")


def test_prepare_message_keeps_existing_headers():
    data = (
        b"From: x@y.z\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <a@b>\r\n\r\nbody\r\n"
    )
    wire, _ = prepare_message(data, extract=False, hostname="h", sender="s@h")
    assert wire == data


def test_prepare_message_extracts_recipients_and_removes_bcc():
    data = (
        b"From mbox-line Mon Jan 1\n"
        b"To: Alice <alice@example.com>, bob@example.org\n"
        b'Cc: "Carol, C." <carol@example.net>\n'
        b"Bcc: secret@example.com,\n\thidden@example.com\n"
        b"Subject: test\n\nHello\n"
    )
    wire, found = prepare_message(data, extract=True, hostname="h", sender="s@h")
    assert found == ["alice@example.com", "bob@example.org", "carol@example.net",
                     "secret@example.com", "hidden@example.com"]  # fmt: skip
    assert b"Bcc" not in wire and b"secret" not in wire and b"hidden" not in wire
    assert not wire.startswith(b"From ")
    msg = email.message_from_bytes(wire, policy=email.policy.default)
    assert msg["Subject"] == "test" and msg["Cc"].addresses[0].addr_spec == "carol@example.net"


def test_prepare_message_obsolete_space_before_colon():
    """RFC 5322 4.5.2 obs-optional: "Subject : x" is a header field, not the start of the body
    (the added fields go after the header block, not in the middle of it)."""
    data = b"Received: a\nSubject : old style\nTo : x@y.test\n\nbody\n"
    wire, found = prepare_message(data, extract=True, hostname="h", sender="s@h")
    head, body = wire.split(b"\r\n\r\n", 1)
    assert b"Subject : old style" in head and body == b"body\r\n" and found == ["x@y.test"]


def test_prepare_message_without_header_section():
    wire, _ = prepare_message(b"just text\n", extract=False, hostname="h", sender="")
    head, body = wire.split(b"\r\n\r\n", 1)
    assert body == b"just text\r\n"
    assert b"From:" not in head  # null sender: no From added
    assert b"Date:" in head


@pytest.mark.parametrize(
    "addr, expected",
    [
        ("a@example.com", "a@example.com"),
        ("<a@example.com>", "a@example.com"),
        ("root", "root@h.test"),
        ("x@[127.0.0.1]", "x@[127.0.0.1]"),
        ("x@[IPv6:::1]", "x@[IPv6:::1]"),
        ('"a b"@ex.com', '"a b"@ex.com'),
        ("üser@exämple.com", "üser@exämple.com"),
    ],
)
def test_check_address_accepts(addr, expected):
    assert check_address(addr, "h.test") == expected


@pytest.mark.parametrize(
    "addr",
    [
        "",
        "<>",
        "@example.com",
        "a b@example.com",
        "a@",
        "a@-bad.com",
        "a@exa mple.com",
        "a@[999.1.1.1]",
        "x" * 65 + "@example.com",
        "a@" + "b" * 64 + ".com",
        "a@" + ".".join(["b" * 60] * 5),
        ".a@example.com",
        "a<b@example.com",
        "a@b..com",
        "a+tag@sub.example.com.",  # RCPT TO refuses a trailing dot (RFC 5321 4.1.2 Domain)
        '"a"b"@example.com',  # an unbalanced quote
    ],
)
def test_check_address_rejects(addr):
    with pytest.raises(ValueError):
        check_address(addr, "h.test")


# --------------------------------------------------------------------------- send into a spool


def _read_spool(root) -> list[tuple[object, bytes]]:
    """Adopt the injected messages with a real Spool (as a server shard would) and read them."""
    from fastmta.spool.spool import Spool

    async def go():
        spool = Spool(
            os.path.join(root, "shard-test"), fsync=False, incoming=os.path.join(root, "incoming")
        )
        msgs = await spool.open()
        out = [(m.envelope, spool.read(m)) for m in msgs]
        await spool.close()
        return out

    return asyncio.run(go())


needs_spool = pytest.mark.skipif(
    importlib.util.find_spec("fastmta.spool.inject") is None,
    reason="fastmta.spool.inject not written yet",
)


@needs_spool
def test_send_into_spool(tmp_path):
    spool = tmp_path / "spool"
    message = (
        b"Subject: hello\nTo: Rcpt <rcpt@example.com>\nBcc: blind@example.net\n\n.dot line\nbye\n"
    )
    r = run(
        "send",
        "-t",
        "-f",
        "sender@example.org",
        "--spool",
        str(spool),
        "extra@example.com",
        stdin=message,
    )
    assert r.returncode == 0, r.stderr
    queue_id = r.stdout.decode().strip()
    assert queue_id and "\n" not in queue_id
    [(env, wire)] = _read_spool(str(spool))
    assert env.id == queue_id
    assert env.sender == "sender@example.org"
    assert [rc.address for rc in env.recipients] == [
        "extra@example.com",
        "rcpt@example.com",
        "blind@example.net",
    ]
    assert env.size == len(wire)
    assert b"Bcc" not in wire and b"\r\n..dot line\r\nbye\r\n" in wire
    assert wire.startswith(b"Subject: hello\r\n") and b"\r\nMessage-ID: <" in wire
    assert f"\r\nMessage-ID: {env.message_id}\r\n".encode() in wire  # the added one


@needs_spool
def test_send_default_sender_and_spool_from_config(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[server]\nhostname = "box.test"\nspool_dir = "{tmp_path / "sp"}"\n')
    r = run(
        "send",
        "-oi",
        "--config",
        str(cfg),
        "a@example.com,b@example.com",
        stdin=b"Subject: x\n\nhi\n",
    )
    assert r.returncode == 0, r.stderr
    [(env, wire)] = _read_spool(str(tmp_path / "sp"))
    assert env.sender.endswith("@box.test")
    assert [rc.address for rc in env.recipients] == ["a@example.com", "b@example.com"]
    assert b"From: " + env.sender.encode() in wire


def test_send_errors(tmp_path):
    spool = str(tmp_path / "spool")
    r = run("send", "--spool", spool, "bad address@example.com", stdin=b"x\n")
    assert r.returncode == 64 and b"bad recipient address" in r.stderr
    r = run("send", "--spool", spool, stdin=b"Subject: x\n\nno rcpt\n")
    assert r.returncode == 64 and b"no recipients" in r.stderr
    r = run("send", "-f", "a b@c", "--spool", spool, "x@example.com", stdin=b"x\n")
    assert r.returncode == 64 and b"bad sender address" in r.stderr
    cfg = tmp_path / "small.toml"
    cfg.write_text('[limits]\nmax_message_size = "64k"\n')
    r = run("send", "--config", str(cfg), "--spool", spool, "x@example.com", stdin=b"x" * 70000)
    assert r.returncode == 65 and b"message too big" in r.stderr
    cfg.write_text("[limits]\nmax_hops = 3\n")
    looped = b"Received: from a by b\nreceived: from c\n\tby d\nRECEIVED: x\nReceived: y\n\nx\n"
    r = run("send", "--config", str(cfg), "--spool", spool, "x@example.com", stdin=looped)
    assert r.returncode == 65 and b"4 Received: header fields, over limits.max_hops (3)" in r.stderr
    assert not os.path.exists(os.path.join(spool, "incoming")) or not os.listdir(
        os.path.join(spool, "incoming")
    )


def test_message_id_is_read_from_the_header_block():
    from fastmta.headers import message_id

    assert message_id(b"Subject: x\r\nMessage-ID:  <a@b>\r\n") == "<a@b>"
    assert message_id(b"message-id :\r\n <folded@x>\r\nX: y\r\n") == "<folded@x>"
    assert message_id(b"Subject: Message-ID: <no@x>\r\n") is None  # not a field of its own
    assert message_id(b"Message-ID:\r\n") is None
    assert message_id(b"Message-ID: <a\x1b[31m@b>\r\n") == "<a[31m@b>"  # no terminal escapes
