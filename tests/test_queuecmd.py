"""`fastmta queue ...` against a real `fastmta serve` subprocess (control sockets) and against
its spool with the server stopped (read-only scan); the CLI always runs as a subprocess.

Mail stays queued because the relayhost is an in-process Sink that answers 451 until a test
lets it accept, and the retry schedule is an hour: only `queue flush` (or release + flush)
makes the server try again.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from collections import Counter

from fastmta.control import NotRunning, Request, ask, header_section, socket_path
from fastmta.protocol.replies import reply
from fastmta.spool import Envelope, Recipient, Spool
from fastmta.testing.sink import Behaviour, Sink, unused_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START_TIMEOUT = 20.0  # seconds for `fastmta serve` to answer on every control socket
WAIT = 10.0  # seconds for a delivery attempt to show up


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("FASTMTA_SPOOL", "XDG_STATE_HOME")}
    env["PYTHONPATH"] = ROOT
    return subprocess.run(
        [sys.executable, "-m", "fastmta.cli", *args],
        capture_output=True, text=True, env=env, timeout=60, cwd=ROOT,
    )  # fmt: skip


class Server:
    """`fastmta serve` on a free loopback port, relaying everything to ``relay_port``."""

    def __init__(self, tmp: str, relay_port: int, workers: int = 1, queue: str = "") -> None:
        self.tmp = tmp
        self.port = unused_port()
        self.workers = workers
        self.spool = os.path.join(tmp, "spool")
        self.config = os.path.join(tmp, "fastmta.toml")
        self.proc: subprocess.Popen[bytes] | None = None
        with open(self.config, "w") as f:
            f.write(
                f'[server]\nhostname = "mta.test"\nworkers = {workers}\n'
                f'spool_dir = "{self.spool}"\nlog_file = "{tmp}/fastmta.log"\n'
                f'[[listener]]\naddress = "127.0.0.1:{self.port}"\n'
                "[queue]\nretry_schedule = [3600]\nretry_jitter = 0.0\ndelay_warning = 0\n"
                f"{queue}\n"
                f'[delivery]\nrelayhost = "[127.0.0.1]:{relay_port}"\ntls = "none"\n'
                "connect_timeout = 3\nidle_timeout = 1\n"
            )

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def q(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`fastmta queue ARGS --config <this server's config>`."""
        return cli("queue", *args, "--config", self.config)

    def start(self) -> Server:
        env = dict(os.environ, PYTHONPATH=ROOT)
        with open(os.path.join(self.tmp, "stderr"), "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fastmta.cli", "serve", "--config", self.config],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT
        for i in range(self.workers):
            while True:
                assert self.proc.poll() is None, self.output()
                try:
                    list(ask(socket_path(self.spool, i), Request("stats"), timeout=5))
                    break
                except (NotRunning, OSError):
                    assert time.monotonic() < deadline, self.output()
                    time.sleep(0.05)
        return self

    def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the group of the process this test started
            proc.wait(5)

    def output(self) -> str:
        with open(os.path.join(self.tmp, "stderr"), "rb") as f:
            return f.read()[-3000:].decode("utf-8", "replace")

    def envelopes(self) -> dict[str, Envelope]:
        """Every queued envelope, asked over the control sockets (fast, for polling)."""
        out = {}
        for i in range(self.workers):
            for line in ask(socket_path(self.spool, i), Request("list")):
                if line.env is not None:
                    out[line.env.id] = line.env
        return out

    def wait_until(self, predicate, what: str) -> dict[str, Envelope]:
        deadline = time.monotonic() + WAIT
        while True:
            envs = self.envelopes()
            if predicate(envs):
                return envs
            assert time.monotonic() < deadline, f"timed out waiting for {what}: {envs}"
            time.sleep(0.05)

    def wait_attempted(self, ids: list[str]) -> dict[str, Envelope]:
        return self.wait_until(
            lambda envs: all(i in envs and envs[i].attempts >= 1 for i in ids), "an attempt"
        )


def send(port: int, rcpts: list[str], subject: str, sender: str = "a@x.test") -> str:
    """One message on its own connection (workers share the port); returns its queue id."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.ehlo()
        s.mail(sender)
        for r in rcpts:
            assert s.rcpt(r)[0] == 250
        code, text = s.data(f"Subject: {subject}\r\nFrom: {sender}\r\n\r\n.dotted\r\n".encode())
    assert code == 250, text
    return text.decode().rsplit(" ", 1)[-1]


class Gate:
    """Sink behaviour: 451 to every recipient while closed (and to each address once when
    ``once`` is set), 250 once opened."""

    def __init__(self, once: bool = False) -> None:
        self.open = threading.Event()
        self.once = once
        self.seen: set[str] = set()

    def __call__(self, address: str):
        if self.once and address not in self.seen:
            self.seen.add(address)
            return reply(451, "4.7.1", "try again later")
        if self.open.is_set() or self.once:
            return None
        return reply(451, "4.7.1", "try again later")


class Counting:
    """Sink behaviour: counts each address offered; ``answer(address)`` gives the reply
    (None, the default: accept)."""

    def __init__(self, answer=lambda address: None) -> None:
        self.answer = answer
        self.offered: Counter[str] = Counter()
        self.lock = threading.Lock()

    def __call__(self, address: str):
        with self.lock:
            self.offered[address] += 1
        return self.answer(address)


def snapshot(root: str) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            st = os.stat(os.path.join(dirpath, name))
            out[os.path.join(dirpath, name)] = (st.st_size, st.st_mtime_ns)
    return out


# ------------------------------------------------------------------------------------ tests


def test_list_show_stats_running_then_stopped(tmp):
    with Sink(behaviour=Behaviour(rcpt_reply=Gate())) as sink:
        srv = Server(tmp, sink.port, workers=2)
        with srv.start():
            ids = [send(srv.port, ["b@y.test", "c@z.test"], f"hello {n}") for n in range(4)]
            srv.wait_attempted(ids)

            r = srv.q("list")
            assert r.returncode == 0, r.stderr
            lines = r.stdout.splitlines()
            assert lines[-1] == "-- 4 messages, " + lines[-1].split(", ")[1] + ", 0 held"
            for qid in ids:
                (line,) = [ln for ln in lines if ln.startswith(qid)]
                assert "<a@x.test> -> <b@y.test> deferred (451 4.7.1 try again later)" in line
                assert "<c@z.test> deferred (451 4.7.1 try again later)" in line
                assert "next: " in line and "held" not in line

            r = srv.q("list", "--json")
            assert r.returncode == 0 and r.stderr.strip().startswith("-- 4 messages")
            items = {d["id"]: d for d in map(json.loads, r.stdout.splitlines())}
            assert set(items) == set(ids)
            rc = items[ids[0]]["recipients"]
            assert [(x["address"], x["state"]) for x in rc] == [
                ("b@y.test", "deferred"),
                ("c@z.test", "deferred"),
            ]
            assert items[ids[0]]["attempts"] == 1 and items[ids[0]]["held"] is False
            assert items[ids[0]]["next_attempt"] > time.time() + 3000

            r = srv.q("show", ids[2])
            assert r.returncode == 0, r.stderr
            assert f"queue id:     {ids[2]}" in r.stdout
            assert "recipient:    <b@y.test> deferred: 451 4.7.1 try again later" in r.stdout
            assert "Subject: hello 2\nFrom: a@x.test\n" in r.stdout and "dotted" not in r.stdout
            r = srv.q("show", ids[0], "0000nope")
            assert r.returncode == 1 and "0000nope: no such message" in r.stderr
            assert ids[0] in r.stdout

            r = srv.q("stats", "--json")
            assert r.returncode == 0, r.stderr
            rows = [json.loads(ln) for ln in r.stdout.splitlines()]
            assert sorted(row["worker"] for row in rows) == [0, 1]
            assert sum(row["deferred"] for row in rows) == 8  # 4 messages x 2 recipients
            assert sum(row["spool"] for row in rows) == 4
            r = srv.q("stats")
            assert r.returncode == 0 and r.stdout.splitlines()[-2].split()[0] == "total"
            # 451 4.7.1 "try again later": the phrase says more than the generic 4.7.1
            assert r.stdout.splitlines()[-1] == "failed attempts by class: TransientFailure 8"

            # the protocol refuses nonsense with an error line, and the worker carries on
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(socket_path(srv.spool, 0))
                s.sendall(b'{"cmd": "explode"}\n')
                answer = json.loads(s.makefile("rb").readline())
            assert answer["end"] is True and "unknown command" in answer["error"]
        assert sink.count == 0

    # stopped: the same listing from the spool files, which are not touched
    assert not os.listdir(os.path.join(srv.spool, "control"))  # sockets removed at stop
    before = snapshot(srv.spool)
    r = srv.q("list")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert sorted(ln.split()[0] for ln in lines[:-1]) == sorted(ids)
    assert all("deferred (451 4.7.1 try again later)" in ln for ln in lines[:-1])
    assert lines[-1].startswith("-- 4 messages")
    r = srv.q("show", ids[1])
    assert r.returncode == 0 and "Subject: hello 1\n" in r.stdout
    assert snapshot(srv.spool) == before
    # changes on a stopped server go into the spool directly (postsuper on a stopped queue)
    r = srv.q("hold", ids[1])
    assert r.returncode == 0 and r.stdout == "held: 1 message\n", r.stderr
    r = srv.q("delete", ids[0], "0000nope")
    assert r.returncode == 1 and r.stdout == "deleted: 1 message\n"
    assert "0000nope: no such message" in r.stderr
    lines = srv.q("list").stdout.splitlines()
    assert sorted(ln.split()[0] for ln in lines[:-1]) == sorted(ids[1:])
    assert [ln.split()[0] for ln in lines[:-1] if "held" in ln.split("<")[0]] == [ids[1]]
    assert lines[-1].startswith("-- 3 messages")
    r = srv.q("stats")
    assert r.returncode == 69 and "not running" in r.stderr


def test_hold_survives_restart_then_release(tmp):
    gate = Gate()
    with Sink(behaviour=Behaviour(rcpt_reply=gate)) as sink:
        srv = Server(tmp, sink.port)
        with srv.start():
            a = send(srv.port, ["held@y.test"], "keep me")
            b = send(srv.port, ["free@y.test"], "let me go")
            srv.wait_attempted([a, b])
            r = srv.q("hold", a)
            assert (r.returncode, r.stdout.strip()) == (0, "held: 1 message"), r.stderr
            r = srv.q("hold", a, "0000nope")
            assert r.returncode == 1 and "0000nope: no such message" in r.stderr
            lines = srv.q("list").stdout.splitlines()
            assert "  held  " in next(ln for ln in lines if ln.startswith(a))
            assert "  held  " not in next(ln for ln in lines if ln.startswith(b))
            assert lines[-1].endswith(", 1 held")
            srv.stop()

            lines = srv.q("list").stdout.splitlines()  # stopped: read from the spool
            assert "  held  " in next(ln for ln in lines if ln.startswith(a))

            gate.open.set()
            srv.start()
            assert srv.envelopes()[a].held
            r = srv.q("flush")
            assert r.returncode == 0, r.stderr
            assert sink.wait_for(1, WAIT)
            srv.wait_until(lambda envs: set(envs) == {a}, "b delivered")
            assert [m.recipients for m in sink.messages] == [["free@y.test"]]

            r = srv.q("release", a)  # due now, although its retry time is an hour away
            assert (r.returncode, r.stdout.strip()) == (0, "released: 1 message"), r.stderr
            assert sink.wait_for(2, WAIT)
            srv.wait_until(lambda envs: not envs, "an empty queue")
            assert sink.messages[1].recipients == ["held@y.test"]


def test_delete_by_id_and_all_without_bounce(tmp):
    with Sink(behaviour=Behaviour(rcpt_reply=Gate())) as sink:
        srv = Server(tmp, sink.port, workers=2)
        with srv.start():
            ids = [send(srv.port, [f"r{n}@y.test"], f"m{n}") for n in range(3)]
            srv.wait_attempted(ids)
            r = srv.q("delete", ids[0])
            assert (r.returncode, r.stdout.strip()) == (0, "deleted: 1 message"), r.stderr
            assert set(srv.envelopes()) == set(ids[1:])
            r = srv.q("delete", ids[0])
            assert r.returncode == 1 and f"{ids[0]}: no such message" in r.stderr
            r = srv.q("hold", "--all")
            assert (r.returncode, r.stdout.strip()) == (0, "held: 2 messages")
            r = srv.q("delete", "--all")
            assert (r.returncode, r.stdout.strip()) == (0, "deleted: 2 messages")
            r = srv.q("list")
            assert r.stdout.strip() == "-- 0 messages, 0 bytes, 0 held"  # and no DSN queued
        assert sink.count == 0
    r = srv.q("list")  # the DONE records are in the spool: still gone after the stop
    assert r.stdout.strip() == "-- 0 messages, 0 bytes, 0 held"


def test_flush_all_and_by_id(tmp):
    with Sink(behaviour=Behaviour(rcpt_reply=Gate(once=True))) as sink:
        srv = Server(tmp, sink.port)
        with srv.start():
            x = send(srv.port, ["x@y.test"], "x")
            y = send(srv.port, ["y@y.test"], "y")
            envs = srv.wait_attempted([x, y])
            assert envs[x].recipients[0].last_reply == "451 4.7.1 try again later"
            assert sink.count == 0
            r = srv.q("flush", y, "0000nope")
            assert r.returncode == 1 and "0000nope: no such message" in r.stderr
            assert sink.wait_for(1, WAIT)
            assert sink.messages[0].recipients == ["y@y.test"]
            srv.wait_until(lambda envs: set(envs) == {x}, "y delivered")
            r = srv.q("flush")
            assert r.returncode == 0 and "retry every deferred message" in r.stdout
            assert sink.wait_for(2, WAIT)
            srv.wait_until(lambda envs: not envs, "an empty queue")
            rows = [json.loads(ln) for ln in srv.q("stats", "--json").stdout.splitlines()]
            assert (rows[0]["delivered"], rows[0]["deferred"]) == (2, 2)


def test_parked_messages_listed_changed_and_delivered(tmp):
    """queue.max_resident 4: most of the deferred mail is parked on disk, and every command
    still sees it, running and stopped."""
    gate = Gate()
    with Sink(behaviour=Behaviour(rcpt_reply=gate)) as sink:
        srv = Server(tmp, sink.port, queue="max_resident = 4\npark_batch = 2")
        with srv.start():
            ids = [send(srv.port, [f"r{n}@y.test"], f"m{n}") for n in range(12)]
            srv.wait_attempted(ids)
            shard = os.path.join(srv.spool, "shard-0", "parked")
            deadline = time.monotonic() + WAIT
            while len(os.listdir(shard)) < 4:
                assert time.monotonic() < deadline, os.listdir(shard)
                time.sleep(0.05)
            stats = json.loads(srv.q("stats", "--json").stdout.splitlines()[0])
            assert stats["queued"] == 12 and stats["parked"] >= 8, stats
            lines = srv.q("list").stdout.splitlines()
            assert lines[-1].startswith("-- 12 messages") and {ln[:24] for ln in lines} >= set(ids)
            parked = [e.id for e in _parked_envelopes(shard)]
            victim, held = parked[0], parked[1]
            r = srv.q("show", held)
            assert r.returncode == 0 and "Subject: m" in r.stdout, r.stderr
            r = srv.q("delete", victim)
            assert (r.returncode, r.stdout.strip()) == (0, "deleted: 1 message"), r.stderr
            r = srv.q("hold", held)
            assert (r.returncode, r.stdout.strip()) == (0, "held: 1 message"), r.stderr
            srv.stop()

            lines = srv.q("list").stdout.splitlines()  # stopped: parked files read too
            assert lines[-1] == f"-- 11 messages, {lines[-1].split(', ')[1]}, 1 held"
            assert victim not in {ln[:24] for ln in lines}
            r = srv.q("release", held)  # stopped: its parked file is rewritten
            assert (r.returncode, r.stdout.strip()) == (0, "released: 1 message"), r.stderr

            gate.open.set()
            srv.start()
            r = srv.q("flush")
            assert r.returncode == 0, r.stderr
            assert sink.wait_for(11, 30)
            srv.wait_until(lambda envs: not envs, "an empty queue")
            got = sorted(m.recipients[0] for m in sink.messages)
            assert len(got) == 11 and len(set(got)) == 11


def _parked_envelopes(directory: str) -> list[Envelope]:
    from fastmta.spool.parked import envelopes, list_parked  # noqa: PLC0415

    shard = os.path.dirname(directory)
    return [e for pf in list_parked(shard, cleanup=False) for e, _, _ in envelopes(shard, pf.name)]


def test_errors_and_injected_mail_without_server(tmp):
    spool = os.path.join(tmp, "spool")
    r = cli("queue", "list", "--spool", spool)
    assert r.returncode == 2 and "no spool at" in r.stderr
    r = cli("queue", "--spool", spool, "hold")
    assert r.returncode == 2 and "give queue ids, --all, --domain or --sender" in r.stderr
    r = cli("queue", "--spool", spool, "delete", "abc", "--all")
    assert r.returncode == 2 and "--all selects every message" in r.stderr
    r = cli("queue", "--spool", spool, "bounce", "--domain", "x.test", "--all")
    assert r.returncode == 2 and "--all selects every message" in r.stderr
    r = cli("queue", "--spool", spool, "bounce", "abc", "--reason", "two\nlines")
    assert r.returncode == 2 and "--reason: the reason must be one line" in r.stderr
    r = cli("queue", "--spool", spool, "hold", "abc", "-")
    assert r.returncode == 2 and "'-' (queue ids from stdin) goes alone" in r.stderr
    r = cli("queue", "list", "--config", os.path.join(tmp, "absent.toml"))
    assert r.returncode == 2 and "config file not found" in r.stderr

    r = subprocess.run(
        [sys.executable, "-m", "fastmta.cli", "send", "--spool", spool, "-f", "me@x.test",
         "you@y.test"],
        input=b"Subject: injected\n\nbody\n", capture_output=True, env=dict(os.environ, PYTHONPATH=ROOT),
        timeout=30,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    qid = r.stdout.decode().strip()
    r = cli("queue", "list", "--spool", spool)
    assert r.returncode == 0 and r.stdout.startswith(qid)
    assert "<me@x.test> -> <you@y.test> pending" in r.stdout
    r = cli("queue", "show", qid, "--spool", spool)
    assert r.returncode == 0 and "Subject: injected\n" in r.stdout
    r = cli("queue", "show", "0000nope", "--spool", spool)
    assert r.returncode == 1 and "no such message" in r.stderr

    r = cli("queue", "--spool", spool, "stats")
    assert r.returncode == 69 and "the server is not running" in r.stderr
    # a socket file left by a crashed worker: nobody answers, so still "not running"
    os.makedirs(os.path.join(spool, "control"))
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(socket_path(spool, 0))
    r = cli("queue", "--spool", spool, "stats")
    assert r.returncode == 69 and "the server is not running" in r.stderr
    # with the server stopped, hold takes the injected message into the first shard
    r = cli("queue", "--spool", spool, "hold", qid)
    assert r.returncode == 0 and r.stdout == "held: 1 message\n", r.stderr
    assert os.listdir(os.path.join(spool, "incoming")) == []
    r = cli("queue", "list", "--spool", spool)
    assert r.returncode == 0 and r.stdout.startswith(qid) and "held" in r.stdout.splitlines()[0]
    r = cli("queue", "--spool", spool, "flush")
    assert r.returncode == 0 and r.stdout == "flush: 1 message due when the server starts\n"
    r = cli("queue", "--spool", spool, "delete", "--all")
    assert r.returncode == 0 and r.stdout == "deleted: 1 message\n"
    assert cli("queue", "list", "--spool", spool).stdout.startswith("-- 0 messages")


def test_stopped_list_replays_updates_and_done_and_reports_progress(tmp):
    """The read-only scan agrees with the spool's own recovery: updates (held, deferred)
    applied, DONE messages gone; progress lines every 10,000 messages."""
    shard = os.path.join(tmp, "spool", "shard-0")
    n = 10_003

    async def fill() -> None:
        spool = Spool(shard, fsync=False, segment_size=1 << 20)
        await spool.open()
        stored = await asyncio.gather(
            *(
                spool.store(Envelope(f"{i:024x}", "s@x.test", [Recipient("r@y.test")], 1e9), b"x")
                for i in range(n)
            )
        )
        for sm in stored[:3]:
            await spool.done(sm.envelope.id)
        env = stored[5].envelope
        env.held = True
        env.recipients[0].state, env.recipients[0].last_reply = 3, "452 4.2.2 full"
        env.attempts = 1
        await spool.update(env)
        await spool.close()

    asyncio.run(fill())
    r = cli("queue", "list", "--spool", os.path.join(tmp, "spool"))
    assert r.returncode == 0, r.stderr
    assert "queue list: 10000 messages so far" in r.stderr
    lines = r.stdout.splitlines()
    assert lines[-1] == f"-- {n - 3} messages, 10.0 kB, 1 held"
    ids = [ln.split()[0] for ln in lines[:-1]]
    assert len(ids) == len(set(ids)) == n - 3 and f"{1:024x}" not in ids
    held = next(ln for ln in lines if ln.startswith(f"{5:024x}"))
    assert "  held  " in held and "<r@y.test> deferred (452 4.2.2 full)" in held


def test_header_section():
    wire = b"Subject: a\r\n..dotted: b\r\n continued\r\n\r\nbody\r\n"
    assert header_section(wire) == "Subject: a\n.dotted: b\n continued\n"
    assert header_section(b"\r\nbody only\r\n") == ""
    assert header_section(b"Subject: " + b"x" * 100, limit=20) == "Subject: " + "x" * 11


def test_summary_counts_recipients_by_domain_and_age(tmp):
    with Sink(behaviour=Behaviour(rcpt_reply=Gate())) as sink:
        srv = Server(tmp, sink.port, workers=2)
        with srv.start():
            a = send(srv.port, ["a1@big.test", "a2@big.test", "x@small.test"], "one")
            b = send(srv.port, ["a3@big.test"], "two")
            srv.wait_attempted([a, b])
            assert srv.q("hold", b).returncode == 0
            r = srv.q("summary")
            assert r.returncode == 0, r.stderr
            lines = r.stdout.splitlines()
            assert lines[0].split() == [
                "domain", "total", "held", "5", "10", "20", "40", "80", "160", "320", "640",
                "1280", "1280+",
            ]  # fmt: skip
            # every recipient is younger than 5 minutes; the held message's in its own column
            assert lines[1].split() == ["TOTAL", "4", "1", "3", *["0"] * 9]
            assert lines[2].split() == ["big.test", "3", "1", "2", *["0"] * 9]
            assert lines[3].split() == ["small.test", "1", "0", "1", *["0"] * 9]
            assert lines[-1] == "-- 2 domains, 2 messages; ages in minutes since arrival"
            r = srv.q("summary", "--top", "1", "--json", "--domain", "small.test")
            (doc,) = [json.loads(x) for x in r.stdout.splitlines()]
            assert (doc["domain"], doc["total"], doc["ages"]["5m"]) == ("big.test", 2, 2)
    r = srv.q("summary")  # stopped: from the spool files, the same table
    assert r.returncode == 0 and r.stdout.splitlines()[1].split()[:4] == ["TOTAL", "4", "1", "3"]


def test_remote_text_cannot_drive_the_terminal():
    """A reply or Message-ID with an escape sequence is shown with "?" for each control."""
    from fastmta.queuecmd import _describe, format_line
    from fastmta.spool.records import Envelope, Recipient

    env = Envelope(
        id="q1", sender="a@b.test", arrival=0.0, message_id="<x\x1b[2J@y>",
        recipients=[Recipient("c@d.test", state=3, last_reply="451 4.3.0 \x1b]0;pwned\x07 later")],
    )  # fmt: skip
    for text in (_describe(env), format_line(env, 0.0)):
        assert "\x1b" not in text and "\x07" not in text
    assert "?]0;pwned? later" in format_line(env, 0.0) and "<x?[2J@y>" in _describe(env)
