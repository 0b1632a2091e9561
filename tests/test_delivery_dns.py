"""DNS outcomes: MX preference order; null MX bounces 556 5.1.10; NXDOMAIN bounces 550 5.1.2;
a domain without MX or address bounces 550 5.4.4 (as Postfix does); SERVFAIL defers 451 4.4.3."""

from __future__ import annotations

import asyncio

from delivery_harness import Harness

from fastmta.spool import RcptState
from fastmta.testing.sink import Behaviour


def test_preference_order(tmp_path):
    async def main():
        async with Harness(tmp_path, {"127.0.0.2": Behaviour(), "127.0.0.3": Behaviour()}) as h:
            h.mx("example.test", (20, "mx2.example.test", "127.0.0.2"),
                 (10, "mx1.example.test", "127.0.0.3"))  # fmt: skip
            for i in range(3):
                await h.send("a@sender.test", [f"u{i}@example.test"])
            await h.until(lambda: h.sinks["127.0.0.3"].count == 3)
            assert h.sinks["127.0.0.2"].connections == 0
            assert {r["mx"] for r in h.records()} == {"mx1.example.test"}

    asyncio.run(main())


def test_null_mx_and_nxdomain_bounce_servfail_defers(tmp_path):
    async def main():
        async with Harness(tmp_path, retry=60) as h:
            h.dns.null_mx("nullmx.test")
            h.dns.servfail("broken.test")
            h.dns.add_name("empty.test")  # exists, no MX, no A/AAAA
            h.mx("sender.test", (10, "mx.sender.test", "127.0.0.2"))
            sm = await h.send(
                "s@sender.test",
                ["a@nullmx.test", "b@nxdomain.test", "c@broken.test", "d@empty.test"],
            )
            sink = h.sinks["127.0.0.2"]
            await h.until(lambda: sink.count == 1)  # one DSN, both permanent failures in it
            env = h.live(sm.envelope.id).envelope
            states = [r.state for r in env.recipients]
            assert states == [
                RcptState.BOUNCED, RcptState.BOUNCED, RcptState.DEFERRED, RcptState.BOUNCED
            ]  # fmt: skip
            assert env.recipients[0].last_reply.startswith("556 5.1.10")
            assert env.recipients[1].last_reply.startswith("550 5.1.2")
            assert env.recipients[2].last_reply.startswith("451 4.4.3")
            assert env.recipients[3].last_reply.startswith("550 5.4.4")
            by = {r["recipient"]: r for r in h.records()}
            assert (
                by["a@nullmx.test"]["outcome"] == "bounced" and by["a@nullmx.test"]["code"] == 556
            )
            assert by["b@nxdomain.test"]["outcome"] == "bounced"
            assert by["c@broken.test"]["outcome"] == "deferred"
            dsn = sink.messages[0].data
            assert b"Status: 5.1.10" in dsn and b"Status: 5.1.2" in dsn and b"Status: 5.4.4" in dsn
            assert b"c@broken.test" not in dsn.split(b"Content-Description: Undelivered")[0]

    asyncio.run(main())
