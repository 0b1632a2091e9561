"""Relay policy: who may send mail where. The one place that decides "open relay or not".

Rule (Postfix ``permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination``):
a recipient is accepted when its domain is local, or the client is in ``mynetworks``, or the
session is authenticated. Everything else gets 554 5.7.1 "Relay access denied" — no
configuration makes fastmta an open relay.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

__all__ = ["RELAY_DENIED", "Networks", "RelayPolicy"]

# RFC 5321 4.2.3 (554 transaction failed), RFC 3463 3.8 (5.7.1 delivery not authorized).
RELAY_DENIED: tuple[int, str, str] = (554, "5.7.1", "Relay access denied")

_SEEN_MAX = 4096  # client addresses whose mynetworks answer Networks remembers


def _parse_ip(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = ip.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if text[:5].lower() == "ipv6:":  # RFC 5321 4.1.3 address literal form
        text = text[5:]
    text = text.partition("%")[0]  # scope id ("fe80::1%eth0")
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped  # "::ffff:10.0.0.1" is 10.0.0.1 (dual-stack sockets)
    return addr


class Networks:
    """A set of CIDR networks with O(number of distinct prefix lengths) membership tests.

    ``"10.0.0.1" in Networks(["10.0.0.0/8"])``. IPv4-mapped IPv6 addresses ("::ffff:10.0.0.1")
    match IPv4 networks; "[1.2.3.4]" and "fe80::1%eth0" forms are accepted; anything that is not
    an IP address is simply not contained. Raises ValueError for a bad CIDR at construction.
    """

    __slots__ = ("_v4", "_v6", "_seen", "cidrs")

    def __init__(self, cidrs: Iterable[str]) -> None:
        self.cidrs = list(cidrs)
        # prefix length -> set of network integers; a lookup masks the address once per length.
        self._v4: dict[int, set[int]] = {}
        self._v6: dict[int, set[int]] = {}
        for cidr in self.cidrs:
            net = ipaddress.ip_network(cidr.strip(), strict=False)
            if isinstance(net, ipaddress.IPv6Network) and net.network_address.ipv4_mapped:
                v4 = net.network_address.ipv4_mapped
                net = ipaddress.ip_network(f"{v4}/{max(net.prefixlen - 96, 0)}", strict=False)
            table = self._v4 if net.version == 4 else self._v6
            table.setdefault(net.prefixlen, set()).add(int(net.network_address))
        # Answers by client address text: a connection asks once or twice, and parsing an
        # address with ipaddress costs more than the rest of a RCPT. Bounded: cleared when full.
        self._seen: dict[str, bool] = {}

    def __contains__(self, ip: object) -> bool:
        if not isinstance(ip, str):
            return False
        known = self._seen.get(ip)
        if known is not None:
            return known
        if len(self._seen) >= _SEEN_MAX:
            self._seen.clear()
        found = self._seen[ip] = self._lookup(ip)
        return found

    def _lookup(self, ip: str) -> bool:
        addr = _parse_ip(ip)
        if addr is None:
            return False
        if addr.version == 4:
            table, bits = self._v4, 32
        else:
            table, bits = self._v6, 128
        value = int(addr)
        all_ones = (1 << bits) - 1
        for plen, nets in table.items():
            mask = all_ones ^ ((1 << (bits - plen)) - 1)
            if value & mask in nets:
                return True
        return False

    def __repr__(self) -> str:
        return f"Networks({self.cidrs!r})"


def _norm_domain(domain: str) -> str:
    return domain.strip().rstrip(".").lower()


class DomainSet:
    """Domain names matched case-insensitively (a trailing dot ignored); an entry with a
    leading dot (".example.com") matches every subdomain, like Postfix's
    ``parent_domain_matches_subdomains``."""

    def __init__(self, domains: Iterable[str]) -> None:
        self._exact: set[str] = set()
        parents = []
        for d in domains:
            if d.strip().startswith("."):
                parents.append("." + _norm_domain(d).lstrip("."))
            else:
                self._exact.add(_norm_domain(d))
        self._parents = tuple(parents)

    def __bool__(self) -> bool:
        return bool(self._exact or self._parents)

    def __contains__(self, domain: str) -> bool:
        d = _norm_domain(domain)
        if d in self._exact:
            return True
        return bool(self._parents) and d.endswith(self._parents)


class RelayPolicy:
    """Relay decisions for RCPT TO.

    ``mynetworks``: CIDRs (or a Networks) whose clients may relay without AUTH.
    ``local_domains``: domains delivered here (see DomainSet for the matching).
    ``relay_domains``: domains anyone may send to, relayed on to their MX hosts or route
    (a backup MX, a gateway in front of internal servers; Postfix ``relay_domains``).
    ``relay_recipients``: "user@domain" (or "@domain": all of it) entries; a relay domain with
    any entry takes only those (Postfix ``relay_recipient_maps``: no bounces for made-up
    addresses later, no backscatter).
    """

    def __init__(
        self,
        mynetworks: Iterable[str] | Networks,
        local_domains: Iterable[str],
        relay_domains: Iterable[str] = (),
        relay_recipients: Iterable[str] = (),
    ) -> None:
        self.mynetworks = mynetworks if isinstance(mynetworks, Networks) else Networks(mynetworks)
        self._local = DomainSet(local_domains)
        self._relay = DomainSet(relay_domains)
        self._relay_users: dict[str, set[str]] = {}  # domain -> local parts ("" = any)
        for entry in relay_recipients:
            user, _, domain = entry.strip().lower().rpartition("@")
            self._relay_users.setdefault(_norm_domain(domain), set()).add(user)

    def is_local(self, domain: str) -> bool:
        """True if mail for ``domain`` is delivered here (case-insensitive; trailing dot ok)."""
        return domain in self._local

    def relay_recipient_check(self, address: str, domain: str) -> None | tuple[int, str, str]:
        """None unless ``address`` is at a relay domain with a recipient list that lacks it:
        then (550, "5.1.1", "<address>: Recipient address rejected: User unknown in relay
        recipient table"), Postfix's answer."""
        if not self._relay_users:
            return None
        users = self._relay_users.get(_norm_domain(domain))
        if users is None or "" in users or domain not in self._relay:
            return None
        if address.rpartition("@")[0].lower() in users:
            return None
        return (550, "5.1.1", f"<{address}>: Recipient address rejected: "
                "User unknown in relay recipient table")  # fmt: skip

    def may_relay(self, client_ip: str, authenticated: bool) -> bool:
        """True if this client may send to any domain (authenticated, or in mynetworks)."""
        return authenticated or client_ip in self.mynetworks

    def rcpt_allowed(
        self, client_ip: str, authenticated: bool, domain: str
    ) -> None | tuple[int, str, str]:
        """None if RCPT to ``domain`` is allowed, else (554, "5.7.1", "Relay access denied").

        No I/O. ``domain`` is the part after the last "@" of the recipient; an empty domain
        (e.g. "postmaster") is treated as local (RFC 5321 4.5.1 requires accepting postmaster).
        """
        if (
            not domain
            or domain in self._local
            or self.may_relay(client_ip, authenticated)
            or (self._relay and domain in self._relay)
        ):
            return None
        return RELAY_DENIED
