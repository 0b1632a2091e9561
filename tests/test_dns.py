"""fastmta.dns.Resolver against a real DNS server on loopback (fastmta.testing.dnsserver).

Every test runs under plain asyncio and under uvloop. Query counts are read at the server,
so single-flight and the negative cache are measured where the traffic would be.
"""

from __future__ import annotations

import asyncio
import time
import warnings
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import uvloop

from fastmta.dns import Destination, DnsError, Resolver
from fastmta.testing.dnsserver import DnsTestServer


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Callable[[Awaitable[Any]], Any]:
    """Run a coroutine to completion on a fresh loop of the parametrised kind."""
    factory = uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop

    def _run(coro: Awaitable[Any]) -> Any:
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(coro)  # type: ignore[arg-type]

    return _run


@pytest.fixture
def dns() -> Iterator[DnsTestServer]:
    with DnsTestServer() as server:
        yield server


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make(dns: DnsTestServer, **kw: Any) -> Resolver:
    kw.setdefault("timeout", 1.0)
    kw.setdefault("tries", 1)
    return Resolver([dns.address], **kw)


def names(dest: Destination) -> list[str]:
    return [h.name for h in dest.hosts]


async def error_of(coro: Awaitable[Any]) -> DnsError:
    with pytest.raises(DnsError) as info:
        await coro
    return info.value


# -- RFC 5321 section 5.1 ordering -----------------------------------------------------------


def test_preference_order_and_addresses(run, dns):
    dns.add_mx("order.test", (20, "b.order.test"), (10, "a.order.test"), (30, "c.order.test"))
    dns.add_a("a.order.test", "127.0.0.1")
    dns.add_a("b.order.test", "127.0.0.2", "127.0.0.3")
    dns.add_a("c.order.test", "127.0.0.4")

    async def main():
        async with make(dns) as r:
            return await r.destination("Order.Test.")

    dest = run(main())
    assert dest.domain == "order.test"
    assert names(dest) == ["a.order.test", "b.order.test", "c.order.test"]
    assert [h.preference for h in dest.hosts] == [10, 20, 30]
    assert dest.hosts[1].addresses == ("127.0.0.2", "127.0.0.3")


def test_equal_preferences_are_shuffled_per_call(run, dns):
    dns.add_mx("spread.test", (10, "m1.spread.test"), (10, "m2.spread.test"), (5, "p.spread.test"))
    for host in ("m1", "m2", "p"):
        dns.add_a(f"{host}.spread.test", "127.0.0.1")

    async def main():
        async with make(dns) as r:
            return [names(await r.destination("spread.test")) for _ in range(200)], r.stats

    orders, stats = run(main())
    assert all(o[0] == "p.spread.test" for o in orders)  # the lower preference always first
    seconds = {o[1] for o in orders}
    assert seconds == {"m1.spread.test", "m2.spread.test"}  # both come first among the tie
    assert dns.count("spread.test", "MX") == 1  # one resolution, shuffled per call
    assert stats.destinations_built == 1 and stats.destination_hits == 199


def test_implicit_mx_when_mx_is_nodata(run, dns):
    dns.add_a("implicit.test", "127.0.0.9")
    dns.add_aaaa("implicit.test", "::1")

    async def main():
        async with make(dns) as r:
            return await r.destination("implicit.test")

    dest = run(main())
    assert dest.site == "implicit.test"
    assert [(h.name, h.preference, h.addresses) for h in dest.hosts] == [
        ("implicit.test", 0, ("127.0.0.9", "::1"))
    ]
    assert dns.count("implicit.test", "MX") == 1


def test_domain_address_never_used_when_mx_exists(run, dns):
    dns.add_mx("hasmx.test", (10, "gone.hasmx.test"))
    dns.add_a("hasmx.test", "127.0.0.7")  # must be ignored: MX records exist

    async def main():
        async with make(dns) as r:
            return await error_of(r.destination("hasmx.test"))

    err = run(main())
    assert (err.code, err.enhanced, err.transient) == (550, "5.4.4", False)
    assert dns.count("hasmx.test", "A") == 0


def test_mx_host_without_address_is_skipped(run, dns):
    dns.add_mx("skip.test", (10, "dead.skip.test"), (20, "live.skip.test"))
    dns.add_name("dead.skip.test")  # exists, no A/AAAA
    dns.add_a("live.skip.test", "127.0.0.2")

    async def main():
        async with make(dns) as r:
            return await r.destination("skip.test")

    dest = run(main())
    assert names(dest) == ["live.skip.test"]
    assert dest.site == "dead.skip.test,live.skip.test"  # the site is the whole MX set


def test_mx_exchange_that_is_an_ip_address_is_used(run, dns):
    dns.add_mx("literal.test", (10, "127.0.0.5"))

    async def main():
        async with make(dns) as r:
            return await r.destination("literal.test")

    dest = run(main())
    assert dest.hosts[0].addresses == ("127.0.0.5",)
    assert dns.count("127.0.0.5", "A") == 0


def test_mx_host_through_cname(run, dns):
    dns.add_mx("alias.test", (10, "mx.alias.test"))
    dns.add_cname("mx.alias.test", "real.alias.test")
    dns.add_a("real.alias.test", "127.0.0.8")

    async def main():
        async with make(dns) as r:
            return await r.destination("alias.test")

    assert run(main()).hosts[0].addresses == ("127.0.0.8",)


def test_max_mx_hosts_bounds_address_lookups(run, dns):
    hosts = [(10, f"h{i}.many.test") for i in range(6)]
    dns.add_mx("many.test", *hosts)
    for _, host in hosts:
        dns.add_a(host, "127.0.0.1")

    async def main():
        async with make(dns, max_mx_hosts=2) as r:
            return await r.destination("many.test")

    dest = run(main())
    assert len(dest.hosts) == 2
    assert sum(dns.count(h, "A") for _, h in hosts) == 2
    assert dest.site == ",".join(sorted(h for _, h in hosts))


def test_address_literal_domain_needs_no_dns(run, dns):
    async def main():
        async with make(dns) as r:
            return await r.destination("[IPv6:::1]"), await r.destination("[127.0.0.1]")

    v6, v4 = run(main())
    assert v6.hosts[0].addresses == ("::1",) and v4.hosts[0].addresses == ("127.0.0.1",)
    assert sum(dns.queries.values()) == 0


# -- failures: permanent and transient --------------------------------------------------------


def test_null_mx_fails_permanently(run, dns):
    dns.null_mx("nullmx.test")
    dns.add_a("nullmx.test", "127.0.0.1")

    async def main():
        async with make(dns) as r:
            return await error_of(r.destination("nullmx.test"))

    err = run(main())
    assert (err.code, err.enhanced, err.transient) == (556, "5.1.10", False)
    assert dns.count("nullmx.test", "A") == 0  # no fallback to the domain's address
    assert sum(dns.queries.values()) == 1


def test_nxdomain_fails_permanently(run, dns):
    async def main():
        async with make(dns) as r:
            return await error_of(r.destination("nosuch.test"))

    err = run(main())
    assert (err.code, err.enhanced, err.transient) == (550, "5.1.2", False)


def test_nodata_without_addresses_bounces_like_postfix(run, dns):
    dns.add_name("empty.test")

    async def main():
        async with make(dns) as r:
            return await error_of(r.destination("empty.test"))

    err = run(main())
    assert (err.code, err.enhanced, err.transient) == (550, "5.4.4", False)


def test_servfail_is_transient(run, dns):
    dns.servfail("broken.test")

    async def main():
        async with make(dns, failure_ttl=0) as r:
            err = await error_of(r.destination("broken.test"))
            dns.servfail("broken.test", on=False)
            dns.add_a("broken.test", "127.0.0.1")
            return err, await r.destination("broken.test")  # not cached: failure_ttl=0

    err, dest = run(main())
    assert (err.code, err.enhanced, err.transient) == (451, "4.4.3", True)
    assert dest.hosts[0].addresses == ("127.0.0.1",)


def test_failures_are_cached_for_failure_ttl(run, dns):
    dns.servfail("flaky.test")
    clock = FakeClock()

    async def main():
        async with make(dns, failure_ttl=5, clock=clock) as r:
            await error_of(r.destination("flaky.test"))
            await error_of(r.destination("flaky.test"))
            assert dns.count("flaky.test", "MX") == 1
            clock.now += 6
            await error_of(r.destination("flaky.test"))
            assert dns.count("flaky.test", "MX") == 2
            return r.stats

    assert run(main()).failures == 2


def test_timeout_is_transient_and_bounded(run, dns):
    dns.drop("silent.test")

    async def main():
        async with make(dns, timeout=0.2, tries=1) as r:
            start = time.monotonic()
            err = await error_of(r.destination("silent.test"))
            return err, time.monotonic() - start

    err, elapsed = run(main())
    assert (err.code, err.enhanced, err.transient) == (451, "4.4.3", True)
    assert elapsed < 3
    assert dns.count("silent.test", "MX") >= 1


def test_one_mx_host_failing_leaves_the_others_and_shortens_the_entry(run, dns):
    dns.add_mx("partial.test", (10, "sf.partial.test"), (20, "ok.partial.test"))
    dns.servfail("sf.partial.test")
    dns.add_a("ok.partial.test", "127.0.0.2")
    clock = FakeClock()

    async def main():
        async with make(dns, clock=clock, failure_ttl=5) as r:
            return await r.destination("partial.test")

    dest = run(main())
    assert names(dest) == ["ok.partial.test"]
    assert dest.expires == clock.now + 5  # rebuilt soon, when the failure entry ends


def test_all_mx_hosts_failing_is_4_4_3(run, dns):
    dns.add_mx("allbad.test", (10, "x.allbad.test"))
    dns.servfail("x.allbad.test")

    async def main():
        async with make(dns) as r:
            return await error_of(r.destination("allbad.test"))

    err = run(main())
    assert (err.code, err.enhanced) == (451, "4.4.3")


def test_invalid_domain_is_permanent_without_a_query(run, dns):
    async def main():
        async with make(dns) as r:
            return await error_of(r.destination("a" * 64 + ".test"))

    err = run(main())
    assert (err.code, err.enhanced) == (550, "5.1.2")
    assert sum(dns.queries.values()) == 0


# -- caching ----------------------------------------------------------------------------------


def test_ttl_expiry_real_time(dns):
    """Both caches (ours and c-ares') end with the record TTL: a changed MX is seen after it."""
    dns.add_mx("ttl.test", (10, "old.ttl.test"), ttl=1)
    dns.add_a("old.ttl.test", "127.0.0.1", ttl=1)
    dns.add_a("new.ttl.test", "127.0.0.2", ttl=1)

    async def main():
        async with make(dns, min_ttl=0) as r:
            first = await r.destination("ttl.test")
            dns.add_mx("ttl.test", (10, "new.ttl.test"), ttl=1)
            cached = await r.destination("ttl.test")
            await asyncio.sleep(max(0.0, first.expires - time.monotonic()) + 0.05)
            return first, cached, await r.destination("ttl.test")

    first, cached, fresh = asyncio.run(main())
    assert names(first) == names(cached) == ["old.ttl.test"]
    assert names(fresh) == ["new.ttl.test"]
    assert dns.count("ttl.test", "MX") == 2


def test_min_ttl_floor_and_expiry_with_fake_clock(run, dns):
    # TTL 0: c-ares does not cache it, so every miss in our cache reaches the server.
    dns.add_mx("floor.test", (10, "mx.floor.test"), ttl=0)
    dns.add_a("mx.floor.test", "127.0.0.1", ttl=0)
    clock = FakeClock()

    async def main():
        async with make(dns, min_ttl=10, clock=clock) as r:
            dest = await r.destination("floor.test")
            clock.now += 9
            await r.destination("floor.test")
            assert dns.count("floor.test", "MX") == 1
            clock.now += 2
            await r.destination("floor.test")
            assert dns.count("floor.test", "MX") == 2
            return dest

    assert run(main()).expires == 1010


def test_max_ttl_ceiling_and_expires_is_earliest_record(run, dns):
    dns.add_mx("ceil.test", (10, "mx.ceil.test"), ttl=7200)
    dns.add_a("mx.ceil.test", "127.0.0.1", ttl=50)
    clock = FakeClock()

    async def main():
        async with make(dns, min_ttl=0, max_ttl=100, negative_ttl=1000, clock=clock) as r:
            dest = await r.destination("ceil.test")  # asks MX, A, AAAA (NODATA)
            clock.now += 60  # past the A TTL: the destination is rebuilt, only A asked again
            await r.destination("ceil.test")
            mid = r.stats.queries
            clock.now += 45  # 1105: past max_ttl for the MX (1100), not the new A (1110)
            await r.destination("ceil.test")
            return dest, mid, r.stats.queries

    dest, mid, end = run(main())
    assert dest.expires == 1050  # min(MX 7200 -> 100, A 50)
    assert mid == 4
    assert end == 5


def test_negative_cache(run, dns):
    clock = FakeClock()

    async def main():
        async with make(dns, negative_ttl=30, clock=clock) as r:
            first = await error_of(r.destination("neg.test"))
            second = await error_of(r.destination("neg.test"))
            assert dns.count("neg.test", "MX") == 1
            clock.now += 31
            await error_of(r.destination("neg.test"))
            assert dns.count("neg.test", "MX") == 2
            return first, second

    first, second = run(main())
    assert first is not second  # each caller gets its own exception (tracebacks do not grow)
    assert (second.code, second.enhanced) == (550, "5.1.2")


def test_negative_cache_of_nodata_addresses(run, dns):
    dns.add_mx("negaddr.test", (10, "v4only.negaddr.test"))
    dns.add_a("v4only.negaddr.test", "127.0.0.1")
    clock = FakeClock()

    async def main():
        async with make(dns, negative_ttl=30, min_ttl=300, clock=clock) as r:
            for _ in range(3):
                await r.addresses("v4only.negaddr.test")
            return r.stats

    stats = run(main())
    assert dns.count("v4only.negaddr.test", "AAAA") == 1  # NODATA remembered
    assert stats.queries == 2 and stats.cache_hits == 4


def test_single_flight(run, dns):
    dns.add_mx("sf.test", (10, "mx.sf.test"))
    dns.add_a("mx.sf.test", "127.0.0.1")
    dns.add_a("host.sf.test", "127.0.0.2")

    async def main():
        async with make(dns) as r:
            dests = await asyncio.gather(*(r.destination("sf.test") for _ in range(50)))
            addrs = await asyncio.gather(*(r.addresses("host.sf.test") for _ in range(50)))
            return dests, addrs, r.stats

    dests, addrs, stats = run(main())
    assert all(names(d) == ["mx.sf.test"] for d in dests)
    assert all(a == ("127.0.0.2",) for a in addrs)
    assert dns.count("sf.test", "MX") == 1
    assert dns.count("mx.sf.test", "A") == 1
    assert dns.count("host.sf.test", "A") == 1
    assert stats.coalesced >= 49 + 49


def test_single_flight_shares_mx_host_lookups_across_domains(run, dns):
    for domain in ("one.test", "two.test", "three.test"):
        dns.add_mx(domain, (10, "shared.mx.test"))
    dns.add_a("shared.mx.test", "127.0.0.1")

    async def main():
        async with make(dns) as r:
            return await asyncio.gather(
                *(r.destination(d) for d in ("one.test", "two.test", "three.test"))
            )

    dests = run(main())
    assert {d.site for d in dests} == {"shared.mx.test"}
    assert dns.count("shared.mx.test", "A") == 1


def test_cancelled_caller_does_not_cancel_the_others(run, dns):
    dns.add_mx("cancel.test", (10, "mx.cancel.test"))
    dns.add_a("mx.cancel.test", "127.0.0.1")

    async def main():
        async with make(dns) as r:
            first = asyncio.ensure_future(r.destination("cancel.test"))
            second = asyncio.ensure_future(r.destination("cancel.test"))
            await asyncio.sleep(0)
            first.cancel()
            return await second

    assert names(run(main())) == ["mx.cancel.test"]
    assert dns.count("cancel.test", "MX") == 1


# -- addresses, IPv6 preference, sites ---------------------------------------------------------


def test_ipv6_preference(run, dns):
    dns.add_mx("v6.test", (10, "mx.v6.test"))
    dns.add_a("mx.v6.test", "127.0.0.1")
    dns.add_aaaa("mx.v6.test", "::1")

    async def main(prefer: bool):
        async with make(dns, prefer_ipv6=prefer) as r:
            return (await r.destination("v6.test")).hosts[0].addresses, await r.addresses(
                "mx.v6.test"
            )

    assert run(main(False)) == (("127.0.0.1", "::1"), ("127.0.0.1", "::1"))
    assert run(main(True)) == (("::1", "127.0.0.1"), ("::1", "127.0.0.1"))


def test_addresses_edge_cases(run, dns):
    dns.servfail("sf.addr.test")

    async def main():
        async with make(dns) as r:
            return (
                await r.addresses("nothing.addr.test"),
                await r.addresses("[127.0.0.3]"),
                await error_of(r.addresses("sf.addr.test")),
            )

    nothing, literal, err = run(main())
    assert nothing == () and literal == ("127.0.0.3",)
    assert (err.code, err.enhanced, err.transient) == (451, "4.4.3", True)


def test_large_answer_falls_back_to_tcp(run, dns):
    ips = [f"127.1.{i // 200}.{i % 200 + 1}" for i in range(150)]
    dns.add_a("big.test", *ips)

    async def main():
        async with make(dns) as r:
            return await r.addresses("big.test")

    assert run(main()) == tuple(ips)
    assert dns.count("big.test", "A") == 2  # UDP (truncated), then TCP


def test_sites_shared_by_same_mx_set(run, dns):
    dns.add_mx("a.site.test", (10, "MX1.hoster.test"), (20, "mx2.hoster.test"))
    dns.add_mx("b.site.test", (5, "mx2.hoster.test"), (5, "mx1.hoster.test."))
    dns.add_mx("c.site.test", (10, "mx1.hoster.test"))
    dns.add_a("mx1.hoster.test", "127.0.0.1")
    dns.add_a("mx2.hoster.test", "127.0.0.2")
    dns.add_a("d.site.test", "127.0.0.3")

    async def main():
        async with make(dns) as r:
            return [await r.destination(f"{x}.site.test") for x in "abcd"]

    a, b, c, d = run(main())
    assert a.site == b.site == "mx1.hoster.test,mx2.hoster.test"
    assert c.site == "mx1.hoster.test"
    assert d.site == "d.site.test"


# -- the aiodns wrapper ----------------------------------------------------------------------


def test_no_deprecation_warnings(run, dns):
    dns.add_mx("warn.test", (10, "mx.warn.test"))
    dns.add_a("mx.warn.test", "127.0.0.1")

    async def main():
        async with make(dns) as r:
            return await r.destination("warn.test")

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert names(run(main())) == ["mx.warn.test"]


def test_close_ends_lookups_in_flight(run, dns):
    dns.drop("hang.test")

    async def main():
        r = make(dns, timeout=5, tries=2)
        task = asyncio.ensure_future(r.destination("hang.test"))
        await asyncio.sleep(0.1)
        start = time.monotonic()
        r.close()
        err = await error_of(task)
        return err, time.monotonic() - start

    err, elapsed = run(main())
    assert err.transient and elapsed < 2


def test_resolver_survives_a_new_event_loop(dns):
    dns.add_mx("loops.test", (10, "mx.loops.test"))
    dns.add_a("mx.loops.test", "127.0.0.1")
    r = make(dns, min_ttl=0, max_ttl=0)  # nothing cached: the second loop must query again
    assert names(asyncio.run(r.destination("loops.test"))) == ["mx.loops.test"]
    assert names(asyncio.run(r.destination("loops.test"))) == ["mx.loops.test"]
    r.close()


def test_nameserver_validation():
    from fastmta.dns.query import parse_nameserver

    assert parse_nameserver("127.0.0.1:5353") == "127.0.0.1:5353"
    assert parse_nameserver("[::1]:53") == "[::1]:53"
    assert parse_nameserver("::1") == "::1"
    assert parse_nameserver(" 127.0.0.1 ") == "127.0.0.1"
    for bad in ("localhost", "127.0.0.1:0", "127.0.0.1:x", "[::1", "1.2.3.4:70000"):
        with pytest.raises(ValueError):
            parse_nameserver(bad)
    with pytest.raises(ValueError):
        Resolver(["dns.example"])
    with pytest.raises(ValueError):
        Resolver(min_ttl=10, max_ttl=5)


def test_concurrent_questions_are_bounded(run, dns):
    for i in range(60):
        dns.add_a(f"d{i}.burst.test", "127.0.0.1")

    async def main():
        async with make(dns, max_concurrent_queries=8) as r:
            inner = r._client.query
            outstanding = peak = 0

            async def counting(name, qtype):
                nonlocal outstanding, peak
                outstanding += 1
                peak = max(peak, outstanding)
                try:
                    return await inner(name, qtype)
                finally:
                    outstanding -= 1

            r._client.query = counting  # type: ignore[method-assign]
            dests = await asyncio.gather(*(r.destination(f"d{i}.burst.test") for i in range(60)))
            return dests, peak

    dests, peak = run(main())
    assert len(dests) == 60 and peak == 8  # 180 questions, never more than 8 at once
