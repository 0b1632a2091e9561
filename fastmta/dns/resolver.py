"""MX resolution with caching: domain -> :class:`~fastmta.dns.mx.Destination`.

Two cache levels, both TTL-bounded and single-flight:

- records: one entry per ``(name, type)`` question (MX, A, AAAA). Positive answers live for
  their TTL clamped to ``[min_ttl, max_ttl]``; NXDOMAIN and NODATA for ``negative_ttl``
  (RFC 2308 section 5; c-ares does not hand over the SOA, so the TTL is fixed); SERVFAIL and
  timeouts for ``failure_ttl`` (RFC 9520 section 3.2: cache failures briefly, at least 1 s
  is recommended, so a broken domain is not asked again for every queued message).
- destinations: the sorted MX groups with their addresses (a :class:`~fastmta.dns.mx.Plan`),
  or the failure, until the earliest expiry of the records used to build it. Every
  ``destination()`` call draws a fresh order among equal preferences from the cached plan.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable, Sequence
from types import TracebackType

import msgspec

from fastmta.dns.cache import SingleFlight, TtlCache
from fastmta.dns.errors import DnsError
from fastmta.dns.mx import (
    Destination,
    MXHost,
    Plan,
    address_literal,
    is_null_mx,
    mx_candidates,
    normalize_domain,
    order_addresses,
)
from fastmta.dns.query import Answer, DnsClient, QType

__all__ = ["Resolver", "ResolverStats"]

# A failure is stored as its reply parts; each caller gets a fresh DnsError (re-raising one
# shared instance would keep growing its traceback).
_Failure = tuple[int, str, str]


class ResolverStats(msgspec.Struct):
    """Counters since the resolver was made (a snapshot; see ``Resolver.stats``).

    ``queries``: DNS questions sent (c-ares may still answer some from its own cache).
    ``cache_hits``: record lookups answered from this cache. ``coalesced``: lookups that
    joined a question or a destination build already in flight. ``failures``: questions that
    ended in SERVFAIL, timeout or another transient error. ``destinations_built`` and
    ``destination_hits``: destination plans built, and answered from cache.
    """

    queries: int = 0
    cache_hits: int = 0
    coalesced: int = 0
    failures: int = 0
    destinations_built: int = 0
    destination_hits: int = 0


class Resolver:
    """Resolves recipient domains to ordered mail exchangers (RFC 5321 section 5.1).

    ``nameservers``: addresses, optionally with a port (``"127.0.0.1:5353"``,
    ``"[::1]:53"``); ``None`` uses the system resolver configuration (/etc/resolv.conf).
    ``timeout`` is per try, ``tries`` per nameserver. ``prefer_ipv6`` puts each host's IPv6
    addresses before its IPv4 ones. At most ``max_mx_hosts`` MX hosts (the most preferred)
    are resolved per domain; ``max_cache_entries`` bounds each cache level;
    ``max_concurrent_queries`` bounds the questions outstanding at once. ``clock`` gives
    the time base of ``Destination.expires``; ``rng`` draws the order of equal preferences.

    Use from one event loop at a time; the aiodns channel follows the running loop.
    """

    def __init__(
        self,
        nameservers: Sequence[str] | None = None,
        *,
        min_ttl: float = 60,
        max_ttl: float = 86400,
        negative_ttl: float = 300,
        timeout: float = 5.0,
        tries: int = 2,
        prefer_ipv6: bool = False,
        max_mx_hosts: int = 10,
        failure_ttl: float = 5.0,
        max_cache_entries: int = 100_000,
        max_concurrent_queries: int = 256,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        if not 0 <= min_ttl <= max_ttl:
            raise ValueError("need 0 <= min_ttl <= max_ttl")
        if negative_ttl < 0 or failure_ttl < 0:
            raise ValueError("negative_ttl and failure_ttl must be >= 0")
        if max_mx_hosts < 1 or max_concurrent_queries < 1:
            raise ValueError("max_mx_hosts and max_concurrent_queries must be >= 1")
        self.min_ttl = min_ttl
        self.max_ttl = max_ttl
        self.negative_ttl = negative_ttl
        self.failure_ttl = failure_ttl
        self.prefer_ipv6 = prefer_ipv6
        self.max_mx_hosts = max_mx_hosts
        self.clock = clock
        self._rng = rng or random.Random()
        self._client = DnsClient(nameservers, timeout=timeout, tries=tries)
        self._records: TtlCache[tuple[str, QType], Answer] = TtlCache(max_cache_entries, clock)
        self._plans: TtlCache[str, Plan | _Failure] = TtlCache(max_cache_entries, clock)
        self._record_flight: SingleFlight[tuple[str, QType], tuple[Answer, float]] = SingleFlight()
        self._plan_flight: SingleFlight[str, Plan | _Failure] = SingleFlight()
        self._stats = ResolverStats()
        # Bounds the questions outstanding at once: a burst of cold domains (a new campaign)
        # must not overflow the nameserver's or the kernel's UDP buffers and turn into timeouts.
        self.max_concurrent_queries = max_concurrent_queries
        self._query_slots: asyncio.Semaphore | None = None
        self._slots_loop: asyncio.AbstractEventLoop | None = None

    @property
    def stats(self) -> ResolverStats:
        """A snapshot of the counters."""
        joined = self._record_flight.joined + self._plan_flight.joined
        return msgspec.structs.replace(self._stats, coalesced=joined)

    @property
    def nameservers(self) -> list[str] | None:
        """The configured nameservers in c-ares form, ``None`` for the system configuration."""
        return self._client.nameservers

    # -- public lookups -------------------------------------------------------------------------

    async def destination(self, domain: str) -> Destination:
        """Where to deliver mail for ``domain``: MX hosts in the order to try.

        Sorted by preference, equal preferences shuffled on every call; hosts without an
        address are left out. The caller should try at least two addresses before giving
        up (RFC 5321 section 5.1); every address of every host is in the result. An address
        literal (``[192.0.2.1]``, RFC 5321 section 4.1.3) is returned without DNS.

        Raises :class:`DnsError`: 556 5.1.10 null MX; 550 5.1.2 NXDOMAIN or invalid name;
        451 4.4.3 SERVFAIL/timeout; 550 5.4.4 no host has an address. Cached; concurrent
        calls for one domain share one resolution.
        """
        if domain.startswith("["):
            literal = address_literal(domain, bracketed_only=True)
            if literal is None:
                raise DnsError.bad_domain(domain)
            host = MXHost(literal, 0, (literal,))
            return Destination(domain, literal, (host,), math.inf)
        name = normalize_domain(domain)
        cached = self._plans.get(name)
        if cached is not None:
            self._stats.destination_hits += 1
            result = cached[0]
        else:
            result = await self._plan_flight.run(name, lambda: self._build(name))
        if isinstance(result, Plan):
            return result.pick(self._rng)
        raise DnsError(*result)

    async def addresses(self, host: str) -> tuple[str, ...]:
        """A and AAAA addresses of ``host``, the preferred family first. Cached by TTL.

        An IP address (bare or bracketed) is returned as is. ``()`` when the name has no
        address (NXDOMAIN or NODATA for both types); raises ``DnsError`` 451 4.4.3 when
        neither type could be resolved because of a DNS failure.
        """
        literal = address_literal(host)
        if literal is not None:
            return (literal,)
        name = normalize_domain(host)
        found, _, failed = await self._host_addresses(name)
        if not found and failed:
            raise DnsError.lookup_failed(name, "SERVFAIL or timeout for A/AAAA")
        return found

    async def txt(self, name: str) -> tuple[str, ...] | None:
        """The TXT records of ``name`` (each one's strings joined), cached by TTL; ``()`` when
        there are none (NXDOMAIN or NODATA), ``None`` when the lookup failed (SERVFAIL,
        timeout): the caller tells "no record" from "cannot know"."""
        answer, _ = await self._lookup(normalize_domain(name), "TXT")
        if answer.status == "ok":
            return answer.values
        return None if answer.status == "fail" else ()

    def clear_cache(self) -> None:
        """Forget every cached answer and destination (queries in flight still finish)."""
        self._records.clear()
        self._plans.clear()

    def close(self) -> None:
        """Release the DNS channel; lookups in flight end with a transient ``DnsError``.

        The caches survive; a later lookup opens a new channel.
        """
        self._client.close()

    async def aclose(self) -> None:
        """As :meth:`close`, closing the channel through aiodns' coroutine."""
        await self._client.aclose()

    async def __aenter__(self) -> Resolver:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- building a destination -----------------------------------------------------------------

    async def _build(self, name: str) -> Plan | _Failure:
        """Resolve ``name`` into a plan or a failure, and cache it until its records expire."""
        self._stats.destinations_built += 1
        mx, expires = await self._lookup(name, "MX")
        if mx.status == "nxdomain":
            return self._remember(name, DnsError.no_such_domain(name), expires)
        if mx.status == "badname":
            return self._remember(name, DnsError.bad_domain(name), expires)
        if mx.status == "fail":
            return self._remember(name, DnsError.lookup_failed(name, mx.detail), expires)
        if mx.status == "ok":
            if is_null_mx(mx.values):
                return self._remember(name, DnsError.null_mx(name), expires)
            candidates, site = mx_candidates(mx.values, self.max_mx_hosts, self._rng)
        else:  # NODATA: implicit MX, the domain itself at preference 0 (RFC 5321 section 5.1)
            candidates, site = [(0, name)], name
        resolved = await asyncio.gather(*(self._host_addresses(host) for _, host in candidates))
        hosts: list[MXHost] = []
        failed = False
        for (preference, host), (found, host_expires, host_failed) in zip(
            candidates, resolved, strict=True
        ):
            expires = min(expires, host_expires)
            failed = failed or host_failed
            if found:  # RFC 5321 section 5.1: a host without an address is skipped
                hosts.append(MXHost(host, preference, found))
        if not hosts:
            if failed:
                error = DnsError.lookup_failed(name, "SERVFAIL or timeout for MX host addresses")
            else:
                error = DnsError.no_addresses(name)
            return self._remember(name, error, expires)
        plan = Plan(name, site, hosts, expires)
        self._plans.put(name, plan, expires)
        return plan

    def _remember(self, name: str, error: DnsError, expires: float) -> _Failure:
        failure = (error.code, error.enhanced, error.text)
        self._plans.put(name, failure, expires)
        return failure

    async def _host_addresses(self, host: str) -> tuple[tuple[str, ...], float, bool]:
        """``(addresses, expires, failed)``; ``failed``: A or AAAA ended in a DNS failure."""
        literal = address_literal(host)
        if literal is not None:  # lenient: an MX exchange that is an IP address is used as one
            return (literal,), math.inf, False
        (a, a_expires), (aaaa, aaaa_expires) = await asyncio.gather(
            self._lookup(host, "A"), self._lookup(host, "AAAA")
        )
        v4 = a.values if a.status == "ok" else ()
        v6 = aaaa.values if aaaa.status == "ok" else ()
        failed = a.status == "fail" or aaaa.status == "fail"
        found = order_addresses(v4, v6, self.prefer_ipv6)
        return found, min(a_expires, aaaa_expires), failed

    # -- one question ---------------------------------------------------------------------------

    async def _lookup(self, name: str, qtype: QType) -> tuple[Answer, float]:
        """The cached answer to one question, asking (once, however many callers) if needed."""
        key = (name, qtype)
        cached = self._records.get(key)
        if cached is not None:
            self._stats.cache_hits += 1
            return cached
        return await self._record_flight.run(key, lambda: self._fetch(name, qtype))

    async def _fetch(self, name: str, qtype: QType) -> tuple[Answer, float]:
        loop = asyncio.get_running_loop()
        if self._query_slots is None or self._slots_loop is not loop:
            self._query_slots = asyncio.Semaphore(self.max_concurrent_queries)
            self._slots_loop = loop
        async with self._query_slots:
            self._stats.queries += 1
            answer = await self._client.query(name, qtype)
        if answer.status == "ok":
            ttl = min(max(answer.ttl, self.min_ttl), self.max_ttl)
        elif answer.status == "fail":
            self._stats.failures += 1
            ttl = self.failure_ttl
        else:
            ttl = self.negative_ttl
        expires = self.clock() + ttl
        self._records.put((name, qtype), answer, expires)
        return answer, expires
