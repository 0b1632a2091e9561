"""Routing overrides: relayhost "[ip]:port" (no MX lookup) and a per-domain route."""

from __future__ import annotations

import asyncio

from delivery_harness import Harness

from fastmta.spool import RcptState
from fastmta.testing.sink import Behaviour


def test_relayhost_bracketed(tmp_path):
    async def main():
        h = Harness(tmp_path, {"127.0.0.2": Behaviour(), "127.0.0.3": Behaviour()})
        h.start_servers()
        h.overrides = {"delivery": {"relayhost": f"[127.0.0.3]:{h.port}"}}
        try:
            h.mx("example.test", (10, "mx1.example.test", "127.0.0.2"))
            await h.open()
            sm = await h.send("a@sender.test", ["b@example.test", "c@other.test"])
            relay = h.sinks["127.0.0.3"]
            await h.until(lambda: relay.count == 2)  # one transaction per domain
            await h.until(lambda: h.live(sm.envelope.id) is None)
            assert h.sinks["127.0.0.2"].connections == 0
            assert h.dns.count("example.test", "MX") == 0 and h.dns.count("other.test", "MX") == 0
            assert {r["ip"] for r in h.records()} == {"127.0.0.3"}
            await h.close()
        finally:
            h.stop_servers()

    asyncio.run(main())


def test_per_domain_route(tmp_path):
    async def main():
        h = Harness(tmp_path, {"127.0.0.2": Behaviour(), "127.0.0.3": Behaviour()})
        h.start_servers()
        h.overrides = {"domain": {"routed.test": {"route": f"[127.0.0.3]:{h.port}"}}}
        try:
            h.mx("example.test", (10, "mx1.example.test", "127.0.0.2"))
            await h.open()
            await h.send("a@sender.test", ["b@example.test", "c@routed.test"])
            await h.until(
                lambda: h.sinks["127.0.0.2"].count == 1 and h.sinks["127.0.0.3"].count == 1
            )
            assert h.sinks["127.0.0.3"].messages[0].recipients == ["c@routed.test"]
            assert h.dns.count("routed.test", "MX") == 0
            await h.close()
        finally:
            h.stop_servers()

    asyncio.run(main())


def test_relayhost_without_address_defers(tmp_path):
    """A relayhost name without an address is our configuration's fault: 451, never a bounce."""

    async def main():
        h = Harness(tmp_path, {"127.0.0.2": Behaviour()}, retry=60)
        h.start_servers()
        h.overrides = {"delivery": {"relayhost": f"[relay.test]:{h.port}"}}
        try:
            h.dns.add_name("relay.test")
            await h.open()
            sm = await h.send("a@sender.test", ["b@example.test"])
            await h.until(lambda: bool(h.records()))
            rc = h.live(sm.envelope.id).envelope.recipients[0]
            assert rc.state == RcptState.DEFERRED and rc.last_reply.startswith("451 4.4.4")
            await h.close()
        finally:
            h.stop_servers()

    asyncio.run(main())
