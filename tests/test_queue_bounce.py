"""`fastmta queue bounce` and the --domain/--sender/`-` selections, against a real `fastmta
serve` (and its spool with the server stopped); the CLI runs as a subprocess.

The relayhost is an in-process Sink that defers every recipient except the senders, so the
DSNs the bounces make are delivered to it while the queued mail stays deferred.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

from test_queuecmd import ROOT, WAIT, Counting, Server, send

from fastmta.protocol.replies import reply
from fastmta.testing.sink import Behaviour, Sink

REASON = "the provider blocks us"


CANCELLED = f"Delivery cancelled by the mail system administrator: {REASON}"


def DeferAllBut() -> Counting:  # noqa: N802 - a behaviour, made like a class
    """Sink behaviour: 451 to every recipient except those at x.test (where DSNs go)."""
    return Counting(lambda a: None if a.endswith("@x.test") else reply(451, "4.7.1", "later"))


def q_input(srv: Server, stdin: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("FASTMTA_SPOOL", "XDG_STATE_HOME")}
    env["PYTHONPATH"] = ROOT
    return subprocess.run(
        [sys.executable, "-m", "fastmta.cli", "queue", *args, "--config", srv.config],
        input=stdin, capture_output=True, text=True, env=env, timeout=60, cwd=ROOT,
    )  # fmt: skip


def dsns(sink: Sink) -> list:
    return [m for m in sink.messages if m.sender == ""]


def states(env) -> dict[str, int]:
    return {r.address: r.state for r in env.recipients}


def test_bounce_by_domain_leaves_other_recipients_and_their_retry_time(tmp):
    peer = DeferAllBut()
    with Sink(behaviour=Behaviour(rcpt_reply=peer)) as sink:
        srv = Server(tmp, sink.port, workers=2)
        with srv.start():
            both = send(srv.port, ["b@slow.test", "c@other.test"], "both")
            other = send(srv.port, ["d@other.test"], "other")
            slow = send(srv.port, ["e@Slow.Test"], "from z", sender="z@x.test")
            before = srv.wait_attempted([both, other, slow])

            r = srv.q("list", "--domain", "SLOW.test")
            assert r.returncode == 0, r.stderr
            assert sorted(ln[:24] for ln in r.stdout.splitlines()[:-1]) == sorted([both, slow])
            r = srv.q("list", "--domain", "slow.test", "--sender", "z@x.test")
            assert [ln[:24] for ln in r.stdout.splitlines()[:-1]] == [slow]

            r = srv.q("bounce", "--domain", "slow.test", "--reason", REASON)
            assert (r.returncode, r.stdout.strip()) == (0, "bounced: 2 messages"), r.stderr
            assert sink.wait_for(2, WAIT), sink.messages
            envs = srv.wait_until(lambda e: slow not in e, "the slow.test-only message gone")

    got = {m.recipients[0]: m for m in dsns(sink)}
    assert set(got) == {"a@x.test", "z@x.test"} and sink.count == 2
    text = got["a@x.test"].data.decode()
    assert "Final-Recipient: rfc822; b@slow.test" in text and "c@other.test" not in text
    assert "Status: 5.0.0" in text and CANCELLED in text.replace("\r\n ", " ")
    # the other recipients: still queued, no retry made, their retry time unchanged
    assert set(envs) == {both, other}
    assert states(envs[both]) == {"b@slow.test": 2, "c@other.test": 3}
    assert envs[both].next_attempt == before[both].next_attempt > time.time() + 3000
    assert envs[both].attempts == 1 and envs[other] == before[other]
    assert peer.offered["c@other.test"] == 1 and peer.offered["d@other.test"] == 1
    with open(os.path.join(srv.spool, "delivery.log")) as f:  # (several workers: one file)
        lines = [json.loads(ln) for ln in f]
    bounced = [x for x in lines if x["outcome"] == "bounced"]
    assert {x["recipient"] for x in bounced} == {"b@slow.test", "e@Slow.Test"}
    assert all(x["site"] == "operator" and x["text"] == CANCELLED for x in bounced)


def test_bounce_held_message_on_a_stopped_server_ids_from_stdin(tmp):
    peer = DeferAllBut()
    with Sink(behaviour=Behaviour(rcpt_reply=peer)) as sink:
        srv = Server(tmp, sink.port)
        with srv.start():
            held = send(srv.port, ["b@slow.test", "c@other.test"], "held")
            kept = send(srv.port, ["d@slow.test"], "from z", sender="z@x.test")
            srv.wait_attempted([held, kept])
            r = srv.q("hold", held)
            assert r.returncode == 0, r.stderr
            srv.stop()

            # stopped: the ids come from `queue list` output, as an operator pipes them
            listing = srv.q("list", "--sender", "a@x.test")
            assert listing.returncode == 0 and listing.stdout.startswith(held)
            r = q_input(srv, listing.stdout, "bounce", "-", "--domain", "slow.test")
            assert (r.returncode, r.stdout.strip()) == (0, "bounced: 1 message"), r.stderr
            lines = srv.q("list").stdout
            assert "<b@slow.test> cancelled (Delivery cancelled" in lines
            assert sink.count == 0

            srv.start()  # the DSN goes out at once, held or not; the rest stays held
            assert sink.wait_for(1, WAIT)
            envs = srv.wait_until(
                lambda e: held in e and states(e[held])["b@slow.test"] == 2, "the bounce"
            )
    (dsn,) = dsns(sink)
    assert dsn.recipients == ["a@x.test"]
    assert "b@slow.test" in dsn.data.decode() and "c@other.test" not in dsn.data.decode()
    assert envs[held].held and states(envs[held])["c@other.test"] == 3
    assert states(envs[kept]) == {"d@slow.test": 3}  # another sender: not selected
    assert peer.offered["c@other.test"] == 1  # held: never tried again


def test_bounce_during_an_attempt_wins_over_its_deferral(tmp):
    """The message is in delivery when the operator bounces it: the attempt ends (451), and
    the recipient bounces with the operator's reason instead of being deferred."""
    answer = threading.Event()
    asked = threading.Event()

    def slow_defer(address: str):
        if address.endswith("@x.test"):
            return None
        asked.set()
        answer.wait(WAIT)  # holds the sink's thread: the transaction stays in flight
        return reply(451, "4.7.1", "try again later")

    with Sink(behaviour=Behaviour(rcpt_reply=slow_defer)) as sink:
        srv = Server(tmp, sink.port)
        try:
            srv.start()
            qid = send(srv.port, ["b@slow.test"], "in flight")
            assert asked.wait(WAIT)
            r = srv.q("bounce", qid, "--reason", REASON)
            assert (r.returncode, r.stdout.strip()) == (0, "bounced: 1 message"), r.stderr
            answer.set()
            assert sink.wait_for(1, WAIT)
            srv.wait_until(lambda e: not e, "an empty queue")
        finally:
            answer.set()
            srv.stop()
    (dsn,) = dsns(sink)
    assert CANCELLED in dsn.data.decode().replace("\r\n ", " ")


def test_bounce_reaches_parked_messages(tmp):
    """queue.max_resident 4: most of the deferred mail is parked on disk; a bounce by domain
    still finds every message, and the parked ones come back to be bounced at once."""
    peer = DeferAllBut()
    with Sink(behaviour=Behaviour(rcpt_reply=peer)) as sink:
        srv = Server(tmp, sink.port, queue="max_resident = 4\npark_batch = 2")
        with srv.start():
            ids = [send(srv.port, [f"r{n}@slow.test"], f"m{n}") for n in range(8)]
            keep = send(srv.port, ["k@other.test"], "keep")
            srv.wait_attempted([*ids, keep])
            shard = os.path.join(srv.spool, "shard-0", "parked")
            deadline = time.monotonic() + WAIT
            while len(os.listdir(shard)) < 2:
                assert time.monotonic() < deadline, os.listdir(shard)
                time.sleep(0.05)
            r = srv.q("bounce", "--domain", "slow.test")
            assert (r.returncode, r.stdout.strip()) == (0, "bounced: 8 messages"), r.stderr
            assert sink.wait_for(8, 30)
            envs = srv.wait_until(lambda e: set(e) == {keep}, "only the other.test one left")
    got = sorted(m.data.decode().split("Final-Recipient: rfc822; ")[1][:12] for m in dsns(sink))
    assert got == sorted(f"r{n}@slow.test" for n in range(8)) and sink.count == 8
    assert states(envs[keep]) == {"k@other.test": 3} and peer.offered["k@other.test"] == 1
