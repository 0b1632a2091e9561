"""Where mail for a recipient domain goes: local Maildir, a smarthost, a per-domain route, or
the domain's MX hosts (Postfix: mydestination, relayhost, transport_maps).

Pure decisions plus one async step (:meth:`Router.destination`) that asks the resolver. The
order of precedence is Postfix's: a local domain is delivered locally; then a per-domain
``route`` (transport map); then the global ``relayhost``; else the domain's MX hosts.

A route written ``"[host]:port"`` is used as is (no MX lookup, RFC 5321 section 5.1 does not
apply to an explicit next hop); ``"host:port"`` looks up the MX records of ``host``, unless
``host`` is an IP address, which is used as if bracketed. Without a port, the global
``delivery.port`` applies (25 unless tests override it).

A configured next hop that does not resolve is our mistake, not the recipient's: its DNS
errors are all transient (451 4.3.5, Postfix's "relayhost configuration problem"), so mail
waits in the queue for the fix instead of bouncing.
"""

from __future__ import annotations

import ipaddress
import math

import msgspec

from fastmta.config import Config, parse_hostport
from fastmta.dns import Destination, DnsError, MXHost, Resolver
from fastmta.dns.mx import address_literal
from fastmta.policy import DomainSet

__all__ = ["Route", "Router", "is_ip", "is_loopback"]


class Route(msgspec.Struct, frozen=True):
    """How to deliver to one recipient domain.

    ``kind``: "local" (Maildir) or "smtp". ``lookup``: the name to resolve; ``bracketed``: use
    ``lookup`` as the host itself (no MX lookup). ``port``: TCP port. ``tls``: "none" |
    "opportunistic" | "required" | "verify". ``auth``: (username, password) for AUTH, relayhost
    only. ``tag``: extra site-key text; domains with per-domain limits get their own site.
    ``sts``: the recipient domain's own MX hosts, so its MTA-STS policy applies (mtasts.py).
    ``via``: "relayhost" or "route" when the next hop comes from configuration, "" for the
    recipient domain's own MX hosts (names the setting in a configuration-problem reply).
    """

    kind: str
    lookup: str = ""
    bracketed: bool = False
    port: int = 25
    tls: str = "opportunistic"
    auth: tuple[str, str] | None = None
    tag: str = ""
    sts: bool = False
    via: str = ""


def is_ip(text: str) -> bool:
    """True when ``text`` is an IPv4 or IPv6 address (no brackets, no "IPv6:" tag)."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def is_loopback(address: str) -> bool:
    """True for 127.0.0.0/8 and ::1 (AUTH without TLS is allowed only there)."""
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _split_next_hop(value: str, default_port: int) -> tuple[str, bool, int]:
    bracketed = value.strip().startswith("[")
    host, port = parse_hostport(value, default_port)
    if not bracketed and is_ip(host):
        # "127.0.0.1:2525" (the documented --relay HOST:PORT form): an address has no MX
        # records to look up, so it is the host itself, as Postfix treats "[127.0.0.1]:2525".
        bracketed = True
    if bracketed and ":" in host and not host.lower().startswith("ipv6:"):
        host = "IPv6:" + host  # keep the RFC 5321 4.1.3 literal form for address_literal()
    return host, bracketed, port


class Router:
    """Maps a recipient domain to a :class:`Route` (cached per domain; config is immutable)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        d = config.delivery
        self._port = d.port
        self._tls = d.tls
        self._local = DomainSet(config.policy.local_domains)
        self._relay: tuple[str, bool, int] | None = None
        if d.relayhost:
            self._relay = _split_next_hop(d.relayhost, d.port)
        self._relay_auth = (d.relay_username, d.relay_password) if d.relay_username else None
        self._cache: dict[str, Route] = {}

    def is_local(self, domain: str) -> bool:
        """True when ``domain`` is a local domain (exact, or a ".suffix" entry matches)."""
        return domain in self._local

    def route(self, domain: str) -> Route:
        """The route for ``domain`` (lower-cased). No I/O."""
        domain = domain.lower()
        r = self._cache.get(domain)
        if r is not None:
            return r
        r = self._build(domain)
        if len(self._cache) < 100_000:  # bounded: domains are unbounded input
            self._cache[domain] = r
        return r

    def _build(self, domain: str) -> Route:
        if self.is_local(domain):
            return Route("local")
        policy = self.config.domain.get(domain.rstrip("."))
        tls = self._tls
        tag = ""
        sts = self.config.delivery.mta_sts
        if policy is not None:
            if policy.mta_sts is not None:
                sts = policy.mta_sts
            if policy.tls is not None:
                tls = policy.tls
            if policy.has_own_limits():
                tag = domain  # its own limits: its own site
            if policy.route:
                host, bracketed, port = _split_next_hop(policy.route, self._port)
                return Route("smtp", host, bracketed, port, tls, None, tag, via="route")
        if self._relay is not None:
            host, bracketed, port = self._relay
            return Route("smtp", host, bracketed, port, tls, self._relay_auth, tag, via="relayhost")
        return Route("smtp", domain, False, self._port, tls, None, tag, sts)

    @staticmethod
    def site_key(route: Route, dest: Destination) -> str:
        """Site key: the MX set (Destination.site), the port, the TLS policy and any tag."""
        key = f"{dest.site}:{route.port}/{route.tls}"
        return f"{key}/{route.tag}" if route.tag else key

    @staticmethod
    async def destination(route: Route, resolver: Resolver) -> Destination:
        """Resolve ``route`` into hosts to try. Raises DnsError (see Resolver.destination);
        only transient ones for a configured next hop (``route.via``)."""
        try:
            return await Router._resolve(route, resolver)
        except DnsError as e:
            if e.transient or not route.via:
                raise
            raise _configuration_problem(route, e) from None

    @staticmethod
    async def _resolve(route: Route, resolver: Resolver) -> Destination:
        if not route.bracketed:
            return await resolver.destination(route.lookup)
        literal = address_literal(f"[{route.lookup}]")
        if literal is not None:
            host = MXHost(literal, 0, (literal,))
            return Destination(route.lookup, literal, (host,), math.inf)
        addresses = await resolver.addresses(route.lookup)
        if not addresses:
            raise DnsError.route_unresolvable(route.lookup)
        host = MXHost(route.lookup, 0, addresses)
        expires = resolver.clock() + resolver.min_ttl
        return Destination(route.lookup, route.lookup.lower(), (host,), expires)


# Why a configured next hop failed, in words about the host rather than the resolver's
# "Recipient domain ... does not exist": the recipient domain is not the one at fault.
_REASONS = {
    "5.1.2": "no such domain or not a valid name",
    "5.1.10": "null MX, accepts no mail",
    "5.4.4": "no address for it or its MX hosts",
}


def _configuration_problem(route: Route, error: DnsError) -> DnsError:
    """A permanent DNS error for a configured relayhost or route, made transient: 451 4.3.5
    (RFC 3463 section 3.4: system not configured properly; Postfix smtp_connect.c defers a
    relayhost it cannot find with "relayhost configuration problem", status 4.3.5). Bouncing
    would lose mail for our own typo, and the bounce, routed the same way, would fail too."""
    reason = _REASONS.get(error.enhanced, error.text)
    text = f"{route.via} {route.lookup}: {reason} (configuration problem)"
    return DnsError(451, "4.3.5", text)
