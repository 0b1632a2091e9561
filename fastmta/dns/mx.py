"""From MX records to the ordered list of hosts to try: RFC 5321 section 5.1, RFC 7505.

Sans-IO: no sockets, no asyncio; :mod:`fastmta.dns.resolver` feeds it DNS answers.

- Hosts are tried in increasing preference; hosts of equal preference in random order, drawn
  afresh for every message (:meth:`Plan.pick`) so load spreads across them (RFC 5321 5.1).
- No MX records (NODATA) means an implicit MX: the domain itself, preference 0. When MX
  records exist the domain's own address is never used (RFC 5321 section 5.1).
- A null MX (RFC 7505 section 3: the only MX is ``0 .``) means the domain takes no mail.
- Domains with the same MX set are one *site* (as in KumoMTA): limits and connections are
  shared per site upstream. Site key: the sorted, lower-cased MX host names joined by ``","``;
  for an implicit MX, the domain itself.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Iterable, Sequence

import msgspec

from fastmta.dns.errors import DnsError

__all__ = [
    "Destination",
    "MXHost",
    "Plan",
    "address_literal",
    "is_null_mx",
    "mx_candidates",
    "normalize_domain",
    "order_addresses",
    "site_key",
]

# RFC 1035 section 2.3.4: a label is at most 63 octets, a name at most 255 octets on the wire,
# which is 253 characters in text form without the trailing dot.
MAX_LABEL = 63
MAX_NAME = 253


class MXHost(msgspec.Struct, frozen=True):
    """One mail exchanger: its name, MX preference and addresses in the order to try."""

    name: str
    preference: int
    addresses: tuple[str, ...] = ()


class Destination(msgspec.Struct, frozen=True):
    """Where mail for ``domain`` goes: ``hosts`` in the order to try.

    Equal preferences are already randomised. ``site`` is shared by domains with the same MX
    set. ``expires`` is the ``Resolver`` clock time (monotonic by default) when this answer
    stops being valid: the earliest expiry of the DNS records it was built from.
    """

    domain: str
    site: str
    hosts: tuple[MXHost, ...]
    expires: float


def normalize_domain(domain: str) -> str:
    """Lower-case, strip the trailing dot, convert a U-label domain to A-labels (IDNA).

    Raises ``DnsError.bad_domain`` (550 5.1.2) for an empty or over-long name or label
    (RFC 1035 section 2.3.4). No I/O.
    """
    name = domain.strip().rstrip(".")
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            raise DnsError.bad_domain(domain) from None
    name = name.lower()
    if not name or len(name) > MAX_NAME:
        raise DnsError.bad_domain(domain)
    if any(not 0 < len(label) <= MAX_LABEL for label in name.split(".")):
        raise DnsError.bad_domain(domain)
    return name


def address_literal(name: str, *, bracketed_only: bool = False) -> str | None:
    """The canonical IP address if ``name`` is an address literal, else ``None``.

    Accepts RFC 5321 section 4.1.3 literals (``[192.0.2.1]``, ``[IPv6:2001:db8::1]``) and,
    unless ``bracketed_only``, bare addresses: an MX exchange must be a name (RFC 5321 section
    5.1), but one that parses as an address is used as one (lenient, as Postfix is).
    """
    text = name.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
        if text[:5].lower() == "ipv6:":
            text = text[5:]
    elif bracketed_only:
        return None
    else:
        text = text.rstrip(".")
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def is_null_mx(records: Sequence[tuple[int, str]]) -> bool:
    """True when every MX record has the root as exchange (RFC 7505 section 3).

    A null MX mixed with real ones violates RFC 7505 ("MUST NOT advertise any other MX RR");
    :func:`mx_candidates` then ignores the ``.`` record and uses the others.
    """
    return bool(records) and all(_is_root(host) for _, host in records)


def _is_root(host: str) -> bool:
    return host in ("", ".")


def site_key(names: Iterable[str]) -> str:
    """The site of an MX set: sorted, lower-cased, de-duplicated names joined by ``","``."""
    return ",".join(sorted({n.lower().rstrip(".") for n in names}))


def mx_candidates(
    records: Iterable[tuple[int, str]], limit: int, rng: random.Random
) -> tuple[list[tuple[int, str]], str]:
    """Sort MX ``(preference, exchange)`` records and keep the first ``limit`` hosts.

    Returns ``(candidates, site)``. Root exchanges are dropped; a name listed twice keeps its
    lowest preference. When the limit cuts through a preference group, the hosts kept from
    that group are drawn at random. The site is computed from the whole MX set, so it does
    not depend on that draw. No I/O.
    """
    best: dict[str, int] = {}
    for pref, host in records:
        name = host.lower().rstrip(".")
        if _is_root(name):
            continue
        if name not in best or pref < best[name]:
            best[name] = pref
    site = site_key(best)
    ordered = sorted(best.items(), key=lambda item: (item[1], item[0]))
    if len(ordered) > limit:
        cut_pref = ordered[limit - 1][1]
        head = [item for item in ordered if item[1] < cut_pref]
        group = [item for item in ordered if item[1] == cut_pref]
        ordered = head + sorted(rng.sample(group, limit - len(head)), key=lambda i: i[0])
    return [(pref, name) for name, pref in ordered], site


def order_addresses(v4: Sequence[str], v6: Sequence[str], prefer_ipv6: bool) -> tuple[str, ...]:
    """Addresses of one host, the preferred family first, DNS order within a family."""
    return (*v6, *v4) if prefer_ipv6 else (*v4, *v6)


class Plan:
    """The sorted MX groups of one domain, cached; :meth:`pick` shuffles equal preferences.

    Hot path contract for :meth:`pick`: no I/O, no await; when every preference group has a
    single host it returns one shared ``Destination`` without allocating.
    """

    __slots__ = ("domain", "site", "groups", "expires", "_fixed")

    def __init__(self, domain: str, site: str, hosts: Sequence[MXHost], expires: float) -> None:
        self.domain = domain
        self.site = site
        self.expires = expires
        groups: list[list[MXHost]] = []
        for host in sorted(hosts, key=lambda h: h.preference):
            if groups and groups[-1][0].preference == host.preference:
                groups[-1].append(host)
            else:
                groups.append([host])
        self.groups: tuple[tuple[MXHost, ...], ...] = tuple(tuple(g) for g in groups)
        self._fixed: Destination | None = None
        if all(len(g) == 1 for g in self.groups):
            ordered = tuple(g[0] for g in self.groups)
            self._fixed = Destination(domain, site, ordered, expires)

    def pick(self, rng: random.Random) -> Destination:
        """A ``Destination`` with hosts of equal preference in a fresh random order."""
        if self._fixed is not None:
            return self._fixed
        hosts: list[MXHost] = []
        for group in self.groups:
            if len(group) == 1:
                hosts.append(group[0])
            else:
                hosts.extend(rng.sample(group, len(group)))
        return Destination(self.domain, self.site, tuple(hosts), self.expires)
