"""`fastmta send` (sendmail-style injection) -> the spool's incoming/ -> a Maildir on a
local domain: with the server running (a worker adopts it within a second) and with the server
stopped (the next start delivers it)."""

from __future__ import annotations

import os
import subprocess

from e2e_harness import REPO, ServerProcess, child_env, fastmta_command, until

# What a program pipes to sendmail: LF line ends, no Date or Message-ID, a line with a dot.
MESSAGE = b"From: a@b.test\nTo: user@local.test\nSubject: local %d\n\nhello\n.dot line\nbye\n"


def fastmta_send(srv: ServerProcess, n: int) -> str:
    """Run ``fastmta send -f a@b.test user@local.test`` with MESSAGE n; returns the queue id."""
    done = subprocess.run(
        fastmta_command("send", "--config", srv.config_path, "-f", "a@b.test", "user@local.test"),
        input=MESSAGE % n,
        capture_output=True,
        cwd=REPO,
        env=child_env(),
        timeout=20,
    )
    assert done.returncode == 0, done.stderr.decode()
    qid = done.stdout.decode().strip()
    assert qid and qid.isascii() and " " not in qid, done.stdout
    return qid


def mailbox(srv: ServerProcess) -> list[bytes]:
    new = os.path.join(srv.maildir, "local.test", "user", "new")
    try:
        names = sorted(os.listdir(new))
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        with open(os.path.join(new, name), "rb") as f:
            out.append(f.read())
    return out


def incoming(srv: ServerProcess) -> list[str]:
    try:
        return [
            n for n in os.listdir(os.path.join(srv.spool_dir, "incoming")) if n.endswith(".msg")
        ]
    except FileNotFoundError:
        return []


def check_delivered(srv: ServerProcess, qid: str, n: int, text: bytes) -> None:
    """The Maildir file: Return-Path and Delivered-To first, added Date and Message-ID, and the
    body exactly as piped in (LF line ends, the dot line un-stuffed again)."""
    assert text.startswith(b"Return-Path: <a@b.test>\nDelivered-To: user@local.test\n"), text
    head, _, body = text.partition(b"\n\n")
    assert b"\nSubject: local %d\n" % n in head + b"\n"
    assert b"\nDate: " in head and b"\nMessage-ID: <" in head
    assert body == b"hello\n.dot line\nbye\n"
    rec = until(
        lambda: [r for r in srv.delivery_records() if r["queue_id"] == qid],
        5,
        "delivery log line",
    )
    assert rec[0]["outcome"] == "delivered" and rec[0]["recipient"] == "user@local.test"
    (got,) = [r for r in srv.received_records() if r["queue_id"] == qid]
    assert got["via"] == "send" and got["client"].startswith("local (uid ")
    assert got["sender"] == "a@b.test" and got["recipients"] == ["user@local.test"]


def local_server(tmp_path) -> ServerProcess:
    return ServerProcess(
        tmp_path, {"server": {"workers": 2}, "policy": {"local_domains": ["local.test"]}}
    )


def test_send_to_running_server(tmp_path):
    srv = local_server(tmp_path)
    with srv:
        srv.wait_workers(2)
        qid = fastmta_send(srv, 1)
        box = until(lambda: mailbox(srv), 10, "Maildir delivery")
        assert len(box) == 1
        check_delivered(srv, qid, 1, box[0])
        assert incoming(srv) == []  # adopted by one of the workers
    assert srv.read_spool() == {}
    assert len(mailbox(srv)) == 1


def test_send_while_stopped_is_delivered_at_next_start(tmp_path):
    srv = local_server(tmp_path)
    qid = fastmta_send(srv, 2)  # no server: the message waits, durable, in incoming/
    assert incoming(srv) == [qid + ".msg"]
    assert mailbox(srv) == []
    with srv:
        box = until(lambda: mailbox(srv), 10, "Maildir delivery after start")
        assert len(box) == 1
        check_delivered(srv, qid, 2, box[0])
        assert incoming(srv) == []
    assert srv.read_spool() == {}
    assert len(mailbox(srv)) == 1
