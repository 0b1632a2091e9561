"""A real receiving MTA behind fastmta: (a) Postfix's smtp-sink dumping each transaction to a
file, (b) a private Postfix instance (own config and queue directories under tmp, no chroot,
its own log file) that accepts mail for pf.test into a Maildir.

Skipped when the Postfix binaries are missing, except in CI (CI=true installs them: a skip
there would hide a broken job). Only the processes started here are stopped: smtp-sink by its
PID, the Postfix instance with ``postfix -c <its config dir> stop``.
"""

from __future__ import annotations

import os
import pathlib
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest
from e2e_harness import ServerProcess, free_port, send, until

SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"
POSTCONF = shutil.which("postconf") or "/usr/sbin/postconf"


def _need(*paths: str) -> None:
    missing = [p for p in paths if not os.access(p, os.X_OK)]
    if not missing:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"Postfix tools missing in CI: {missing}")
    pytest.skip(f"Postfix tools not installed: {missing}")


def _postfix_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam("postfix")
    except KeyError:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip("no 'postfix' user")


@pytest.fixture
def public_tmp():
    """A directory the postfix user can reach: pytest's tmp_path sits under 0700 directories,
    and smtp-sink and Postfix's delivery agents write as user postfix."""
    path = tempfile.mkdtemp(prefix="fastmta-pf-")
    os.chmod(path, 0o755)
    yield pathlib.Path(path)
    shutil.rmtree(path, ignore_errors=True)


def content(tag: bytes) -> bytes:
    return (
        b"From: alice@sender.test\r\nTo: bob@pf.test\r\nMessage-ID: <%s@client.test>\r\n"
        b"Subject: to postfix %s\r\nDate: Mon, 01 Jan 2024 00:00:00 +0000\r\n"
        b"\r\nHello Postfix.\r\n.leading dot\r\n" % (tag, tag)
    )


def _wait_listening(port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                if s.recv(512).startswith(b"220"):
                    return
        except OSError:
            pass
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise AssertionError(f"nothing answers 220 on port {port} after {timeout}s")
        time.sleep(0.05)


# ------------------------------------------------------------------------------ smtp-sink


def test_smtp_sink_receives_relayed_message(tmp_path, public_tmp):
    _need(SMTP_SINK)
    user = _postfix_user()
    dump = public_tmp / "dump"
    dump.mkdir()
    os.chown(dump, user.pw_uid, user.pw_gid)  # smtp-sink drops to -u postfix before writing
    port = free_port()
    argv = [SMTP_SINK, "-u", "postfix", "-d", f"{dump}/%Y%m%d%H%M%S.", f"127.0.0.1:{port}", "10"]
    out = open(public_tmp / "smtp-sink.out", "wb")  # noqa: SIM115 - closed in finally
    sink = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_listening(port, 10, sink)
        srv = ServerProcess(tmp_path, {"delivery": {"relayhost": f"[127.0.0.1]:{port}"}})
        with srv:
            body = content(b"sink1")
            qid = send(srv.host, srv.port, "alice@sender.test", ["bob@pf.test"], body)

            def dumped() -> list[bytes]:
                out = []
                for name in os.listdir(dump):
                    with open(dump / name, "rb") as f:
                        out.append(f.read())
                return [d for d in out if b"Hello Postfix." in d]

            files = until(dumped, 10, "smtp-sink dump file")
            until(
                lambda: any(
                    r["queue_id"] == qid and r["outcome"] == "delivered"
                    for r in srv.delivery_records()
                ),
                5,
                "delivered in the log",
            )
        assert len(files) == 1
        text = files[0]
        # smtp-sink writes the envelope as X- headers before the content
        assert b"X-Helo-Args: mta.test\n" in text, text[:400]
        assert b"X-Mail-Args: <alice@sender.test>" in text
        assert b"X-Rcpt-Args: <bob@pf.test>" in text
        assert b"Received: from " in text and qid.encode() in text
        assert body.replace(b"\r\n", b"\n") in text.replace(b"\r\n", b"\n")
        assert srv.read_spool() == {}
    finally:
        sink.send_signal(signal.SIGTERM)
        try:
            sink.wait(5)
        except subprocess.TimeoutExpired:
            sink.kill()
            sink.wait(5)
        out.close()


# ------------------------------------------------------------------------------ Postfix


MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class PrivatePostfix:
    """A Postfix instance of its own under ``root``: pf.test is a virtual mailbox domain whose
    every address lands in one Maildir, ``root``/vmail/pf.test/inbox/."""

    def __init__(self, root: str, extra: dict[str, str] | None = None) -> None:
        self.root = root
        self.etc = os.path.join(root, "etc")
        self.queue = os.path.join(root, "queue")
        self.data = os.path.join(root, "data")
        self.vmail = os.path.join(root, "vmail")
        self.maillog = os.path.join(root, "maillog")
        self.port = free_port()
        self.started = False
        user = _postfix_user()
        for d in (self.etc, self.queue, self.data, self.vmail):
            os.makedirs(d, mode=0o755, exist_ok=True)
        os.chown(self.data, user.pw_uid, user.pw_gid)
        os.chown(self.vmail, user.pw_uid, user.pw_gid)
        main = {
            "compatibility_level": "3.6",
            "config_directory": self.etc,
            "queue_directory": self.queue,
            "data_directory": self.data,
            "command_directory": "/usr/sbin",
            "daemon_directory": _postconf_default("daemon_directory"),
            "meta_directory": _postconf_default("meta_directory"),
            "shlib_directory": _postconf_default("shlib_directory"),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "maillog_file": self.maillog,
            "maillog_file_prefixes": root,
            "myhostname": "mx.pf.test",
            "mydomain": "pf.test",
            "myorigin": "$myhostname",
            "mydestination": "",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "virtual_mailbox_domains": "pf.test",
            "virtual_mailbox_base": self.vmail,
            "virtual_mailbox_maps": "static:pf.test/inbox/",  # trailing "/": Maildir
            "virtual_uid_maps": f"static:{user.pw_uid}",
            "virtual_gid_maps": f"static:{user.pw_gid}",
            "virtual_minimum_uid": str(min(user.pw_uid, 100)),
            "alias_maps": "",
            "alias_database": "",
            "smtp_tls_security_level": "none",
            "smtpd_tls_security_level": "none",
            "biff": "no",
            **(extra or {}),
        }
        with open(os.path.join(self.etc, "main.cf"), "w") as f:
            f.writelines(f"{k} = {v}\n" for k, v in main.items())
        with open(os.path.join(self.etc, "master.cf"), "w") as f:
            f.write(MASTER_CF.format(port=self.port))

    def _postfix(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [POSTFIX, "-c", self.etc, *args], capture_output=True, timeout=timeout
        )

    def start(self) -> None:
        done = self._postfix("start")
        assert done.returncode == 0, (done.stdout + done.stderr).decode() + self.log()
        self.started = True
        _wait_listening(self.port, 15)

    def stop(self) -> None:
        if not self.started:
            return
        master_pid = self._master_pid()
        self._postfix("stop")
        self.started = False
        # `postfix stop` returns before master has exited; wait for our master only
        deadline = time.monotonic() + 10
        while master_pid and os.path.exists(f"/proc/{master_pid}"):
            if time.monotonic() > deadline:
                os.kill(master_pid, signal.SIGKILL)
                break
            time.sleep(0.05)

    def _master_pid(self) -> int | None:
        try:
            with open(os.path.join(self.queue, "pid", "master.pid")) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    def mailbox(self) -> list[bytes]:
        new = os.path.join(self.vmail, "pf.test", "inbox", "new")
        try:
            names = os.listdir(new)
        except FileNotFoundError:
            return []
        out = []
        for name in sorted(names):
            with open(os.path.join(new, name), "rb") as f:
                out.append(f.read())
        return out

    def log(self) -> str:
        try:
            with open(self.maillog, "rb") as f:
                return f.read()[-3000:].decode("utf-8", "replace")
        except OSError:
            return ""


def _postconf_default(name: str) -> str:
    done = subprocess.run([POSTCONF, "-dh", name], capture_output=True, timeout=10)
    return done.stdout.decode().strip()


def test_private_postfix_accepts_mail_from_fastmta(tmp_path, public_tmp):
    _need(POSTFIX, POSTCONF)
    pf = PrivatePostfix(str(public_tmp / "pf"))
    try:
        pf.start()
        srv = ServerProcess(tmp_path, {"delivery": {"relayhost": f"[127.0.0.1]:{pf.port}"}})
        with srv:
            bodies = {tag: content(tag.encode()) for tag in ("pf1", "pf2")}
            qids = {
                tag: send(srv.host, srv.port, "alice@sender.test", ["bob@pf.test"], body)
                for tag, body in bodies.items()
            }
            box = until(lambda: len(pf.mailbox()) >= 2 and pf.mailbox(), 20, "Postfix Maildir")
        assert len(box) == 2, pf.log()
        for tag, body in bodies.items():
            (text,) = [m for m in box if b"<%s@client.test>" % tag.encode() in m]
            lf = text.replace(b"\r\n", b"\n")
            assert lf.startswith(b"Return-Path: <alice@sender.test>\n"), lf[:300]
            assert b"Delivered-To: bob@pf.test\n" in lf
            # Postfix's Received: (naming our EHLO) sits above ours (naming the queue id)
            theirs = lf.index(b"Received: from mta.test (")
            assert b"by mx.pf.test (Postfix)" in lf[theirs : theirs + 200]
            ours = lf.index(b"by mta.test (fastmta) with ESMTP id " + qids[tag].encode())
            assert theirs < ours
            assert lf.endswith(body.replace(b"\r\n", b"\n")), lf
        log = pf.log()
        assert "status=sent" in log and "delivered to maildir" in log, log
        assert srv.read_spool() == {}
    finally:
        pf.stop()


def test_private_postfix_takes_chained_transactions(tmp_path, public_tmp):
    """A backlog over one connection to a strict Postfix (no CHUNKING, so DATA is used, and
    reject_unauth_pipelining): every message after the first is chained behind its
    predecessor's final dot (delivery.chain_transactions), and Postfix takes them all."""
    _need(POSTFIX, POSTCONF)
    import asyncio

    from delivery_harness import Harness

    n = 10
    pf = PrivatePostfix(
        str(public_tmp / "pf"),
        {
            "smtpd_discard_ehlo_keywords": "chunking",
            "smtpd_data_restrictions": "reject_unauth_pipelining",
        },
    )
    try:
        pf.start()

        async def main():
            overrides = {
                "delivery": {
                    "relayhost": f"[127.0.0.1]:{pf.port}",
                    "max_connections_per_site": 1,
                    "data_done_timeout": 20,
                }
            }
            async with Harness(tmp_path, {}, overrides=overrides) as h:
                h.engine.hold = True  # a backlog: all queued before the first connection
                for i in range(n):
                    await h.send("alice@sender.test", ["bob@pf.test"], content(b"ch%d" % i))
                h.engine.hold = False
                await h.until(lambda: len(h.spool) == 0, 30)
                assert [r["outcome"] for r in h.records()] == ["delivered"] * n, h.records()
                st = h.engine.pool.stats
                assert st.connections_opened == 1 and st.chained == n - 1

        asyncio.run(main())
        box = until(lambda: len(pf.mailbox()) >= n and pf.mailbox(), 20, "Postfix Maildir")
        assert len(box) == n, pf.log()
        for i in range(n):
            assert sum(b"<ch%d@client.test>" % i in m for m in box) == 1
        assert "improper command pipelining" not in pf.log()
    finally:
        pf.stop()
