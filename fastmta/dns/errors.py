"""Resolution failures, each already in the SMTP reply it becomes (errors speak SMTP)."""

from __future__ import annotations

__all__ = ["DnsError"]


class DnsError(Exception):
    """A destination cannot be resolved, with the reply and enhanced status to report.

    ``transient`` failures (4xx) are retried later by the queue; permanent ones (5xx) bounce
    at once. Build them with the class methods so codes stay consistent across the package.
    """

    __slots__ = ("code", "enhanced", "text", "transient")

    def __init__(self, code: int, enhanced: str, text: str) -> None:
        super().__init__(f"{code} {enhanced} {text}")
        self.code = code
        self.enhanced = enhanced
        self.text = text
        self.transient = 400 <= code < 500

    def __reduce__(self) -> tuple[type[DnsError], tuple[int, str, str]]:
        return (type(self), (self.code, self.enhanced, self.text))

    def __repr__(self) -> str:
        return f"DnsError({self.code}, {self.enhanced!r}, {self.text!r})"

    @classmethod
    def null_mx(cls, domain: str) -> DnsError:
        """RFC 7505 section 3: a single ``MX 0 .`` means the domain accepts no mail.

        556 is RFC 7504 section 3 (domain does not accept mail); 5.1.10 is from RFC 7505.
        """
        return cls(556, "5.1.10", f"Recipient domain {domain} has a null MX")

    @classmethod
    def no_such_domain(cls, domain: str) -> DnsError:
        """NXDOMAIN (RFC 2308 section 2.1) for the domain: 550 5.1.2 (RFC 3463 section 3.2)."""
        return cls(550, "5.1.2", f"Recipient domain {domain} does not exist")

    @classmethod
    def bad_domain(cls, domain: str) -> DnsError:
        """The domain is not a valid DNS name (RFC 1035 section 2.3.4): 550 5.1.2."""
        return cls(550, "5.1.2", f"Recipient domain {domain!r} is not a valid domain name")

    @classmethod
    def lookup_failed(cls, name: str, detail: str) -> DnsError:
        """SERVFAIL, timeout or refusal: 451 4.4.3 (RFC 3463 section 3.5: directory failure)."""
        return cls(451, "4.4.3", f"DNS lookup for {name} failed: {detail}")

    @classmethod
    def no_addresses(cls, domain: str) -> DnsError:
        """No MX host (or the implicit MX) has an address, and DNS said so (NXDOMAIN or NODATA,
        no failure): 550 5.4.4 "unable to route" (RFC 3463 section 3.5). Permanent, as in
        Postfix ("Host or domain name not found"); RFC 5321 section 5.1 calls it an error."""
        return cls(
            550,
            "5.4.4",
            f"Host or domain name not found: no mail exchanger of {domain} has an address",
        )

    @classmethod
    def route_unresolvable(cls, host: str) -> DnsError:
        """A configured route (relayhost, transport) names a host without an address: 451
        4.4.4, transient, so a mistake in our own configuration never bounces mail."""
        return cls(451, "4.4.4", f"Configured next hop {host} has no address")
