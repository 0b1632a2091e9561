"""The sans-IO parts of fastmta.dns: MX ordering (mx.py), the TTL cache and single-flight (cache.py)."""

from __future__ import annotations

import asyncio
import pickle
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastmta.dns import DnsError
from fastmta.dns.cache import SingleFlight, TtlCache
from fastmta.dns.mx import (
    MXHost,
    Plan,
    address_literal,
    is_null_mx,
    mx_candidates,
    normalize_domain,
    order_addresses,
    site_key,
)

# -- mx.py -------------------------------------------------------------------------------------


def test_normalize_domain():
    assert normalize_domain("Example.COM.") == "example.com"
    assert normalize_domain("bücher.example") == "xn--bcher-kva.example"
    for bad in ("", ".", "a..b", "a" * 64 + ".com", ".".join(["a" * 60] * 5)):
        with pytest.raises(DnsError) as info:
            normalize_domain(bad)
        assert (info.value.code, info.value.enhanced) == (550, "5.1.2")


def test_address_literal():
    assert address_literal("[192.0.2.1]") == "192.0.2.1"
    assert address_literal("[IPv6:2001:DB8::1]") == "2001:db8::1"
    assert address_literal("192.0.2.1") == "192.0.2.1"
    assert address_literal("192.0.2.1", bracketed_only=True) is None
    assert address_literal("mx.example.com") is None
    assert address_literal("[mx.example.com]") is None


def test_null_mx_detection():
    assert is_null_mx([(0, "")])
    assert is_null_mx([(0, ".")])
    assert not is_null_mx([])
    assert not is_null_mx([(0, ""), (10, "mx.example.com")])  # invalid mix: use the real one
    candidates, site = mx_candidates([(0, ""), (10, "mx.example.com")], 10, random.Random(1))
    assert candidates == [(10, "mx.example.com")] and site == "mx.example.com"


def test_mx_candidates_sort_dedupe_and_site():
    records = [(20, "B.example."), (10, "a.example"), (30, "b.example"), (10, "c.example")]
    candidates, site = mx_candidates(records, 10, random.Random(1))
    assert candidates == [(10, "a.example"), (10, "c.example"), (20, "b.example")]
    assert site == "a.example,b.example,c.example"


@given(
    prefs=st.lists(st.integers(0, 3), min_size=1, max_size=12),
    limit=st.integers(1, 12),
    seed=st.integers(0, 2**32),
)
def test_mx_candidates_limit_keeps_the_most_preferred(prefs, limit, seed):
    records = [(p, f"h{i}.example") for i, p in enumerate(prefs)]
    candidates, site = mx_candidates(records, limit, random.Random(seed))
    assert len(candidates) == min(limit, len(records))
    kept = [p for p, _ in candidates]
    assert kept == sorted(kept) == sorted(prefs)[: len(candidates)]
    assert site == site_key(h for _, h in records)  # independent of the random draw


def test_order_addresses():
    assert order_addresses(["1.2.3.4"], ["::1"], prefer_ipv6=False) == ("1.2.3.4", "::1")
    assert order_addresses(["1.2.3.4"], ["::1"], prefer_ipv6=True) == ("::1", "1.2.3.4")


def test_plan_pick():
    a, b, c = (MXHost(n, p, ("127.0.0.1",)) for n, p in (("a", 10), ("b", 10), ("c", 20)))
    single = Plan("d.example", "a", [c, a], 5.0)
    assert single.pick(random.Random()) is single.pick(random.Random())  # no tie: no allocation
    assert [h.name for h in single.pick(random.Random()).hosts] == ["a", "c"]
    tied = Plan("d.example", "a,b,c", [c, b, a], 5.0)
    rng = random.Random(7)
    firsts = {tied.pick(rng).hosts[0].name for _ in range(100)}
    assert firsts == {"a", "b"}
    assert all(tied.pick(rng).hosts[2].name == "c" for _ in range(20))


def test_dns_error_fields_and_pickling():
    err = DnsError.null_mx("example.com")
    assert (err.code, err.enhanced, err.transient) == (556, "5.1.10", False)
    assert "null MX" in err.text
    copy = pickle.loads(pickle.dumps(DnsError.lookup_failed("x", "timeout")))
    assert (copy.code, copy.enhanced, copy.transient) == (451, "4.4.3", True)


# -- cache.py ----------------------------------------------------------------------------------


def test_ttl_cache_expiry_and_bound():
    now = [0.0]
    cache: TtlCache[str, int] = TtlCache(max_entries=2, clock=lambda: now[0])
    cache.put("a", 1, 10)
    cache.put("b", 2, 20)
    assert cache.get("a") == (1, 10)
    cache.put("c", 3, 30)  # full: the oldest insertion ("a") goes
    assert cache.get("a") is None and cache.get("c") == (3, 30) and len(cache) == 2
    now[0] = 20
    assert cache.get("b") is None  # expires at 20: gone at 20
    cache.put("d", 4, 20)  # already expired: not stored
    assert cache.get("d") is None


def test_single_flight_shares_results_and_errors():
    calls = 0

    async def fetch(value):
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        if isinstance(value, Exception):
            raise value
        return value

    async def main():
        flight: SingleFlight[str, object] = SingleFlight()
        results = await asyncio.gather(*(flight.run("k", lambda: fetch(42)) for _ in range(10)))
        errors = await asyncio.gather(
            *(flight.run("e", lambda: fetch(KeyError("x"))) for _ in range(3)),
            return_exceptions=True,
        )
        again = await flight.run("k", lambda: fetch(43))  # finished flights are forgotten
        return results, errors, again, flight

    results, errors, again, flight = asyncio.run(main())
    assert results == [42] * 10 and again == 43
    assert all(isinstance(e, KeyError) for e in errors)
    assert calls == 3 and flight.joined == 9 + 2 and len(flight) == 0


def test_single_flight_survives_a_cancelled_waiter():
    async def main():
        flight: SingleFlight[str, int] = SingleFlight()

        async def fetch():
            await asyncio.sleep(0.02)
            return 7

        first = asyncio.ensure_future(flight.run("k", fetch))
        second = asyncio.ensure_future(flight.run("k", fetch))
        await asyncio.sleep(0)
        first.cancel()
        return await second, first.cancelled()

    assert asyncio.run(main()) == (7, True)
