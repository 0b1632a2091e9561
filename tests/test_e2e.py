"""End to end: smtplib -> `fastmta serve` (a real subprocess) -> a Sink, through a relayhost
and through MX lookups at a test DNS server; a restart (and a crash) in the middle of a
delivery backlog; a 550 that comes back to the sender's domain as a DSN.

The sink must receive exactly what the client sent, preceded by our Received: field
(RFC 5321 4.4); every attempt is a JSON line in the delivery log.
"""

from __future__ import annotations

import os
import re
import subprocess
import time

import pytest
from e2e_harness import (
    ServerProcess,
    child_env,
    fastmta_command,
    free_port,
    send,
    strip_received,
    until,
)

from fastmta.protocol.replies import reply
from fastmta.spool import RcptState
from fastmta.spool.parked import list_parked
from fastmta.testing.dnsserver import DnsTestServer
from fastmta.testing.sink import Behaviour, Sink

MESSAGE_ID = re.compile(rb"(?im)^Message-ID: *(<[^>\r\n]+>)")


def content(n: int, extra: bytes = b"") -> bytes:
    return (
        b"From: Alice <alice@sender.test>\r\nTo: bob@dest.test\r\n"
        b"Message-ID: <%d.e2e@client.test>\r\nSubject: e2e %d\r\n\r\n"
        b"Hello %d.\r\n.a line that starts with a dot\r\n..and two\r\n\r\nbye\r\n" % (n, n, n)
    ) + extra


def delivered(srv: ServerProcess, qid: str, rcpt: str, since: float = 0.0) -> dict | None:
    for rec in srv.delivery_records():
        if (
            rec["queue_id"] == qid
            and rec["recipient"] == rcpt
            and rec["outcome"] == "delivered"
            and rec["time"] >= since
        ):
            return rec
    return None


def check_received(data: bytes, qid: str, sent: bytes) -> None:
    """``data`` (as the sink got it) is our Received: field for ``qid``, then ``sent``."""
    trace, rest = strip_received(data)
    assert b"by mta.test" in trace and qid.encode() in trace, trace
    assert rest == sent


@pytest.fixture
def dns():
    server = DnsTestServer().start()
    yield server
    server.stop()


def test_relayhost_gets_exact_content_and_log_line(tmp_path):
    with Sink("127.0.0.1", 0) as sink:
        srv = ServerProcess(tmp_path, {"delivery": {"relayhost": f"[127.0.0.1]:{sink.port}"}})
        with srv:
            body = content(1, (b"x" * 70 + b"\r\n") * 100)
            qid = send(srv.host, srv.port, "alice@sender.test", ["bob@dest.test"], body)
            assert sink.wait_for(1, 10), srv.output()
            m = sink.messages[0]
            assert (m.sender, m.recipients, m.helo) == (
                "alice@sender.test",
                ["bob@dest.test"],
                "mta.test",
            )
            check_received(m.data, qid, body)
            rec = until(lambda: delivered(srv, qid, "bob@dest.test"), 5, "delivery log line")
            assert rec["code"] == 250 and rec["ip"] == "127.0.0.1" and rec["attempt"] == 1
            # the message's arrival is a line of its own, before its delivery
            (got,) = srv.received_records()
            assert (got["queue_id"], got["via"], got["sender"], got["recipients"]) == (
                qid, "smtp", "alice@sender.test", ["bob@dest.test"],
            )  # fmt: skip
            assert got["client"].startswith("[127.0.0.1] ") and got["tls"] is False
            assert got["message_id"] == "<1.e2e@client.test>"  # grep the log by Message-ID
            assert got["size"] == m.mail_params.size and got["time"] <= rec["time"]
        assert srv.read_spool() == {}  # delivered: gone from the spool
        assert sink.count == 1


def test_mx_lookup_through_test_dns(tmp_path, dns):
    port = free_port("127.0.0.2")
    dns.add_mx("mx.test", (10, "mx1.mx.test")).add_a("mx1.mx.test", "127.0.0.2")
    dns.add_mx("other.test", (10, "mail.other.test")).add_a("mail.other.test", "127.0.0.3")
    with Sink("127.0.0.2", port) as s2, Sink("127.0.0.3", port) as s3:
        overrides = {
            "dns": {"nameservers": [dns.address], "timeout": 2},
            "delivery": {"port": port},
        }
        with ServerProcess(tmp_path, overrides) as srv:
            body = content(2)
            rcpts = ["one@mx.test", "two@mx.test", "three@other.test"]
            qid = send(srv.host, srv.port, "alice@sender.test", rcpts, body)
            assert s2.wait_for(1, 10) and s3.wait_for(1, 10), srv.output()
            assert s2.messages[0].recipients == ["one@mx.test", "two@mx.test"]
            assert s3.messages[0].recipients == ["three@other.test"]
            for m in (s2.messages[0], s3.messages[0]):
                check_received(m.data, qid, body)
            for r in rcpts:
                until(lambda r=r: delivered(srv, qid, r), 5, f"log line for {r}")
            recs = {r["recipient"]: r for r in srv.delivery_records()}
            assert recs["one@mx.test"]["mx"] == "mx1.mx.test"
            assert recs["three@other.test"]["ip"] == "127.0.0.3"
        assert dns.queries[("mx.test", "MX")] >= 1
        assert srv.read_spool() == {}


@pytest.mark.parametrize(
    "queue", [{}, {"max_resident": 4, "park_batch": 2}], ids=["resident", "parking"]
)
def test_restart_and_crash_in_delivery_backlog(tmp_path, queue):
    """Sink down -> everything defers; stop; sink up (slow); start; crash in mid-delivery;
    start again: every message arrives at least once, and the spool ends empty. With
    ``parking`` most of the backlog waits in parked files, and the crash meets them being
    loaded back."""
    n = 30
    port = free_port()
    relay = {"relayhost": f"[127.0.0.1]:{port}", "max_connections_per_site": 2}
    overrides = {"server": {"workers": 2}, "delivery": relay, "queue": queue}
    srv = ServerProcess(tmp_path, overrides)
    sent: dict[str, tuple[bytes, list[str]]] = {}
    try:
        # 1. nobody listens at the relayhost: connection refused -> deferred
        srv.start()
        srv.wait_workers(2)
        for i in range(n):
            rcpts = [f"u{i}@dest.test"] + ([f"v{i}@dest.test"] if i % 3 == 0 else [])
            qid = send(srv.host, srv.port, "alice@sender.test", rcpts, content(100 + i))
            sent[qid] = (content(100 + i), rcpts)

        def all_deferred() -> bool:
            ids = {r["queue_id"] for r in srv.delivery_records() if r["outcome"] == "deferred"}
            return ids >= set(sent)

        until(all_deferred, 10, "every message deferred")
        assert srv.stop() == 0
        spool = srv.read_spool()
        assert set(spool) == set(sent)
        for env, _ in spool.values():
            assert env.attempts >= 1
            assert all(r.state == RcptState.DEFERRED for r in env.recipients)
        if queue:  # most of the backlog is parked, its state kept
            shards = [os.path.join(srv.spool_dir, d) for d in os.listdir(srv.spool_dir)]
            assert sum(pf.count for d in shards for pf in list_parked(d)) >= n // 2

        with Sink("127.0.0.1", port, Behaviour(delay=0.05)) as sink:
            # 2. the sink is up but slow; crash while the backlog drains
            srv.start()
            assert sink.wait_for(n // 4, 15), srv.output()
            srv.kill()
            assert sink.count < n, "the backlog drained before the crash: make the sink slower"
            live = srv.read_spool()
            assert live and set(live) <= set(sent)
            # 3. a normal sink, a normal start: the rest (and maybe some again) is delivered
            sink.behaviour = Behaviour()
            t3 = time.time()  # delivery-log records of this run are newer
            srv.start()

            def drained() -> bool:
                return all(
                    delivered(srv, qid, r.address, t3)
                    for qid, (env, _) in live.items()
                    for r in env.recipients
                    if r.state != RcptState.DELIVERED
                )

            until(drained, 20, "backlog delivered after the restart")
            assert srv.stop() == 0
            assert srv.read_spool() == {}

            got: dict[bytes, bytes] = {}
            for m in sink.messages:
                mid = MESSAGE_ID.search(m.data)
                assert mid is not None
                got[mid.group(1)] = m.data
            want = {
                MESSAGE_ID.search(body).group(1): (qid, body) for qid, (body, _) in sent.items()
            }
            assert set(got) == set(want), "at-least-once: every message reaches the sink"
            for mid, data in got.items():
                qid, body = want[mid]
                check_received(data, qid, body)
            # each recipient got it: union of recipients per message at the sink
            per_msg: dict[bytes, set[str]] = {}
            for m in sink.messages:
                per_msg.setdefault(MESSAGE_ID.search(m.data).group(1), set()).update(m.recipients)
            for mid, (qid, _) in want.items():
                assert per_msg[mid] == set(sent[qid][1])
    finally:
        srv.close()


def test_550_bounces_to_the_sender_domain(tmp_path, dns):
    port = free_port("127.0.0.2")
    dns.add_mx("rcpt.test", (10, "mx.rcpt.test")).add_a("mx.rcpt.test", "127.0.0.2")
    dns.add_mx("sender.test", (10, "mx.sender.test")).add_a("mx.sender.test", "127.0.0.3")

    def rcpt_reply(address: str):
        return reply(550, "5.1.1", "No such user here") if address.startswith("bad@") else None

    with (
        Sink("127.0.0.2", port, Behaviour(rcpt_reply=rcpt_reply)) as dest,
        Sink("127.0.0.3", port) as home,
    ):
        overrides = {
            "dns": {"nameservers": [dns.address], "timeout": 2},
            "delivery": {"port": port},
        }
        with ServerProcess(tmp_path, overrides) as srv:
            body = content(3)
            rcpts = ["good@rcpt.test", "bad@rcpt.test"]
            qid = send(srv.host, srv.port, "alice@sender.test", rcpts, body)
            assert dest.wait_for(1, 10), srv.output()
            assert dest.messages[0].recipients == ["good@rcpt.test"]
            assert home.wait_for(1, 10), srv.output()
            dsn = home.messages[0]
            assert dsn.sender == "" and dsn.recipients == ["alice@sender.test"]  # RFC 5321 4.5.5
            text = dsn.data
            assert b"multipart/report" in text and b"report-type=delivery-status" in text
            assert re.search(rb"(?i)Final-Recipient: *rfc822; *bad@rcpt.test", text), text
            assert re.search(rb"(?i)Action: *failed", text)
            assert re.search(rb"(?i)Status: *5\.1\.1", text)
            assert len(re.findall(rb"(?i)Final-Recipient:", text)) == 1  # bad only
            assert b"Message-ID: <3.e2e@client.test>" in text  # the original (or its headers)

            def outcomes() -> dict[tuple[str, str], str]:
                recs = srv.delivery_records()
                return {(r["queue_id"], r["recipient"]): r["outcome"] for r in recs}

            until(lambda: (qid, "bad@rcpt.test") in outcomes(), 5, "log line of the bounce")
            assert outcomes()[(qid, "bad@rcpt.test")] == "bounced"
            assert outcomes()[(qid, "good@rcpt.test")] == "delivered"
            # the DSN was taken into the queue too, and says which message it reports on
            got = {r["via"]: r for r in srv.received_records()}
            assert got["smtp"]["queue_id"] == qid
            assert (got["dsn"]["origin"], got["dsn"]["sender"]) == (qid, "")
            assert got["dsn"]["recipients"] == ["alice@sender.test"]
        assert srv.read_spool() == {}
        assert home.count == 1 and dest.count == 1


def test_second_server_on_the_same_port_refuses_to_start(tmp_path):
    """Workers listen with SO_REUSEPORT; a second `fastmta serve` (same user, other spool) on
    the same port must not join them and take a share of the connections into its spool."""
    with ServerProcess(tmp_path, {"server": {"hold_delivery": True}}, name="first") as first:
        second = ServerProcess(tmp_path, name="second")
        second.port = first.port
        second.configure({"server": {"hold_delivery": True}})
        done = subprocess.run(
            fastmta_command("serve", "--config", second.config_path),
            capture_output=True,
            env=child_env(),
            timeout=20,
        )
        second.close()
        assert done.returncode == 2, done.stderr
        assert b"address already in use" in done.stderr
        for _ in range(10):
            send(first.host, first.port, "alice@sender.test", ["bob@dest.test"], content(4))
    assert len(first.read_spool()) == 10
