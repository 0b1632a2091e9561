"""An MX that leads back to this MTA (it greets with our own name). As in Postfix ("mail for
... loops back to myself"): as the best MX we bounce 5.4.6 at once, instead of circling until
the hop limit; as a backup MX we hand mail only to better MX hosts, and wait while they fail."""

from __future__ import annotations

import asyncio

from delivery_harness import Harness

from fastmta.protocol.replies import reply
from fastmta.spool import RcptState
from fastmta.testing.sink import Behaviour

MYSELF = Behaviour(greeting=reply(220, None, "mta.test ESMTP fastmta"))  # the harness's name
BUSY = Behaviour(greeting=reply(421, "4.3.2", "busy"))


def test_best_mx_is_myself_bounces(tmp_path):
    async def main():
        sinks = {"127.0.0.2": MYSELF, "127.0.0.3": Behaviour(), "127.0.0.4": Behaviour()}
        async with Harness(tmp_path, sinks) as h:
            h.mx("loop.test", (10, "mx.loop.test", "127.0.0.2"),
                 (20, "backup.loop.test", "127.0.0.4"))  # fmt: skip
            h.mx("sender.test", (10, "mx.sender.test", "127.0.0.3"))
            sm = await h.send("a@sender.test", ["b@loop.test"])
            dsn_sink = h.sinks["127.0.0.3"]
            await h.until(lambda: dsn_sink.count == 1)
            await h.until(lambda: h.live(sm.envelope.id) is None)
            assert sm.envelope.recipients[0].state == RcptState.BOUNCED
            (rec,) = [r for r in h.records() if r["queue_id"] == sm.envelope.id]
            assert (rec["outcome"], rec["code"], rec["enhanced"]) == ("bounced", 550, "5.4.6")
            assert "loops back to myself" in rec["text"]
            dsn = dsn_sink.messages[0]
            assert dsn.sender == "" and dsn.recipients == ["a@sender.test"]
            assert b"Status: 5.4.6" in dsn.data
            assert h.sinks["127.0.0.2"].transactions == 0  # never a MAIL FROM to ourselves
            assert h.sinks["127.0.0.4"].connections == 0  # nor to an MX worse than us

    asyncio.run(main())


def test_backup_mx_waits_for_the_better_one(tmp_path):
    async def main():
        sinks = {"127.0.0.2": BUSY, "127.0.0.3": MYSELF}
        async with Harness(tmp_path, sinks, retry=0.3) as h:
            h.mx("example.test", (10, "mx1.example.test", "127.0.0.2"),
                 (20, "mx2.example.test", "127.0.0.3"))  # fmt: skip
            sm = await h.send("a@sender.test", ["b@example.test"])
            await h.until(lambda: h.engine.stats.deferred == 1)
            env = h.live(sm.envelope.id).envelope
            assert env.recipients[0].state == RcptState.DEFERRED  # not bounced
            assert env.recipients[0].last_reply.startswith("421 4.3.2")
            h.sinks["127.0.0.2"].behaviour = Behaviour()
            await h.until(lambda: h.sinks["127.0.0.2"].count == 1)
            await h.until(lambda: h.live(sm.envelope.id) is None)
            assert h.sinks["127.0.0.3"].transactions == 0

    asyncio.run(main())


def test_relay_domain_from_an_outsider_goes_to_its_mx(tmp_path):
    """policy.relay_domains through the real server: a client outside mynetworks may send to a
    relay domain (delivered to its MX), not to others."""
    import smtplib

    from e2e_harness import ServerProcess

    from fastmta.testing.dnsserver import DnsTestServer
    from fastmta.testing.sink import Sink, unused_port

    dns = DnsTestServer().start()
    port = unused_port("127.0.0.2")
    try:
        dns.add_mx("backup.test", (10, "mx.backup.test")).add_a("mx.backup.test", "127.0.0.2")
        with Sink("127.0.0.2", port) as sink:
            over = {
                "policy": {
                    "mynetworks": ["192.0.2.0/24"],
                    "relay_domains": ["backup.test"],
                    "relay_recipients": ["b@backup.test"],
                },
                "dns": {"nameservers": [dns.address], "timeout": 2},
                "delivery": {"port": port},
            }
            with ServerProcess(tmp_path, over) as srv:
                with smtplib.SMTP(srv.host, srv.port, timeout=10) as c:
                    c.ehlo("client.test")
                    assert c.mail("a@sender.test")[0] == 250
                    assert c.rcpt("b@backup.test")[0] == 250
                    code, text = c.rcpt("made-up@backup.test")  # not in relay_recipients
                    assert (code, text[:5]) == (550, b"5.1.1")
                    assert c.rcpt("c@elsewhere.test")[0] == 554
                    assert c.data(b"Subject: x\r\n\r\nhi\r\n")[0] == 250
                assert sink.wait_for(1, 10), srv.output()
                assert sink.messages[0].recipients == ["b@backup.test"]
    finally:
        dns.stop()
