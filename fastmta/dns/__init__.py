"""MX resolution: the only package that imports aiodns.

``Resolver.destination(domain)`` turns a recipient domain into a :class:`Destination`: the
MX hosts in the order to try (RFC 5321 section 5.1), their addresses, and the *site* shared
by domains with the same MX set. Failures raise :class:`DnsError`, which carries its SMTP
reply (556 5.1.10 null MX, 550 5.1.2 no such domain, 550 5.4.4 no address, 451 4.4.3 try
later).
"""

from fastmta.dns.errors import DnsError
from fastmta.dns.mx import Destination, MXHost
from fastmta.dns.resolver import Resolver, ResolverStats

__all__ = ["Destination", "DnsError", "MXHost", "Resolver", "ResolverStats"]
