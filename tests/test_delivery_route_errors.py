"""A configured next hop that does not resolve is our configuration's fault, not the recipient's:
an unbracketed relayhost or route ("host:port", MX-resolved) with NXDOMAIN, a null MX or no
address defers 451 4.3.5 (Postfix: "relayhost configuration problem"), never bounces. A next
hop that is an IP address ("127.0.0.3:port") is used as the host, as if bracketed: no MX lookup.
"""

from __future__ import annotations

import asyncio

import pytest
from delivery_harness import Harness

from fastmta.config import load_config
from fastmta.delivery.routing import Router
from fastmta.dns import Resolver
from fastmta.spool import RcptState
from fastmta.testing.sink import Behaviour


def _break(h: Harness, name: str, how: str) -> None:
    """Make ``name`` fail in DNS the way ``how`` says (each a permanent error for a domain)."""
    if how == "nullmx":
        h.dns.null_mx(name)  # 556 5.1.10 for a recipient domain
    elif how == "noaddress":
        h.dns.add_name(name)  # exists, no MX, no A/AAAA: 550 5.4.4
    # "nxdomain": not in the zone at all, 550 5.1.2


@pytest.mark.parametrize("how", ["nxdomain", "nullmx", "noaddress"])
def test_unresolvable_relayhost_defers(tmp_path, how):
    async def main():
        h = Harness(tmp_path, {"127.0.0.2": Behaviour()}, retry=60)
        h.start_servers()
        h.overrides = {"delivery": {"relayhost": f"smarthost.typo.test:{h.port}"}}
        try:
            _break(h, "smarthost.typo.test", how)
            h.mx("example.test", (10, "mx.example.test", "127.0.0.2"))
            h.mx("sender.test", (10, "mx.sender.test", "127.0.0.2"))
            await h.open()
            sm = await h.send("a@sender.test", ["b@example.test"])
            await h.until(lambda: bool(h.records()))
            rc = h.live(sm.envelope.id).envelope.recipients[0]
            assert rc.state == RcptState.DEFERRED, rc.last_reply
            assert rc.last_reply.startswith("451 4.3.5 relayhost smarthost.typo.test")
            assert "configuration problem" in rc.last_reply
            assert [r["outcome"] for r in h.records()] == ["deferred"]
            assert h.engine.stats.bounced == 0 and h.engine.stats.dsns == 0
            assert h.sinks["127.0.0.2"].connections == 0  # relayhost only, never the MX
            await h.close()
        finally:
            h.stop_servers()

    asyncio.run(main())


def test_unresolvable_route_defers(tmp_path):
    """Only the routed domain waits; the others go on; no DSN reaches the sender's MX."""

    async def main():
        h = Harness(tmp_path, {"127.0.0.2": Behaviour()}, retry=60)
        h.start_servers()
        h.overrides = {"domain": {"customer.test": {"route": f"gw.typo.test:{h.port}"}}}
        try:
            h.mx("example.test", (10, "mx.example.test", "127.0.0.2"))
            h.mx("customer.test", (10, "mx.customer.test", "127.0.0.2"))
            h.mx("sender.test", (10, "mx.sender.test", "127.0.0.2"))
            await h.open()
            sm = await h.send("a@sender.test", ["b@example.test", "c@customer.test"])
            sink = h.sinks["127.0.0.2"]
            await h.until(lambda: sink.count == 1 and len(h.records()) == 2)
            assert sink.messages[0].recipients == ["b@example.test"]
            rc = h.live(sm.envelope.id).envelope.recipients[1]
            assert rc.state == RcptState.DEFERRED, rc.last_reply
            assert rc.last_reply.startswith("451 4.3.5 route gw.typo.test")
            assert h.engine.stats.bounced == 0 and h.engine.stats.dsns == 0
            await asyncio.sleep(0.2)  # a DSN, if one were made, would reach the sink by now
            assert sink.count == 1
            await h.close()
        finally:
            h.stop_servers()

    asyncio.run(main())


def test_recipient_domain_nxdomain_still_bounces(tmp_path):
    """Only configured next hops are excused: the recipient's own domain still bounces."""

    async def main():
        h = Harness(tmp_path, {"127.0.0.2": Behaviour()}, retry=60)
        h.start_servers()
        try:
            h.mx("sender.test", (10, "mx.sender.test", "127.0.0.2"))
            await h.open()
            sm = await h.send("a@sender.test", ["b@nxdomain.test"])
            await h.until(lambda: h.sinks["127.0.0.2"].count == 1)  # the DSN
            assert h.live(sm.envelope.id) is None
            assert h.records()[0]["outcome"] == "bounced" and h.records()[0]["code"] == 550
            await h.close()
        finally:
            h.stop_servers()

    asyncio.run(main())


def test_relayhost_unbracketed_ip(tmp_path):
    """`fastmta serve --relay 127.0.0.3:PORT`: the address is the host, not an MX domain."""

    async def main():
        h = Harness(tmp_path, {"127.0.0.2": Behaviour(), "127.0.0.3": Behaviour()})
        h.start_servers()
        h.overrides = {"delivery": {"relayhost": f"127.0.0.3:{h.port}"}}
        try:
            h.mx("example.test", (10, "mx.example.test", "127.0.0.2"))
            await h.open()
            sm = await h.send("a@sender.test", ["b@example.test"])
            await h.until(lambda: h.live(sm.envelope.id) is None)
            assert h.sinks["127.0.0.3"].count == 1
            assert h.sinks["127.0.0.2"].connections == 0
            assert [r["outcome"] for r in h.records()] == ["delivered"]
            for qtype in ("MX", "A", "AAAA"):
                assert h.dns.count("127.0.0.3", qtype) == 0
            assert h.dns.count("example.test", "MX") == 0
            await h.close()
        finally:
            h.stop_servers()

    asyncio.run(main())


@pytest.mark.parametrize(
    ("relayhost", "lookup", "port", "address"),
    [
        ("127.0.0.3:2525", "127.0.0.3", 2525, "127.0.0.3"),
        ("127.0.0.3", "127.0.0.3", 25, "127.0.0.3"),
        ("::1", "IPv6:::1", 25, "::1"),
    ],
)
def test_unbracketed_ip_next_hop_needs_no_dns(relayhost, lookup, port, address):
    """Route and per-domain route alike; the resolver points nowhere and is never asked."""
    config = load_config(
        None,
        {
            "delivery": {"relayhost": relayhost, "port": 25},
            "domain": {"routed.test": {"route": relayhost}},
        },
    )
    router = Router(config)

    async def main():
        resolver = Resolver(["127.0.0.1:9"], timeout=0.1, tries=1)  # discard port: no answer
        try:
            for domain in ("example.test", "routed.test"):
                route = router.route(domain)
                assert (route.lookup, route.bracketed, route.port) == (lookup, True, port)
                dest = await Router.destination(route, resolver)
                assert [h.addresses for h in dest.hosts] == [(address,)]
            assert resolver.stats.queries == 0
        finally:
            resolver.close()

    asyncio.run(main())
