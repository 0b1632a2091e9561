"""One DNS question, one classified answer: the only module that imports aiodns.

aiodns 4 deprecates ``query()`` (results converted to the pycares 4 shapes) in favour of
``query_dns()`` (the native pycares 5 ``DNSResult``). :class:`DnsClient` uses ``query_dns``
when it exists and falls back to ``query`` on aiodns 3, so neither path raises a
DeprecationWarning and no warning filter is needed.

c-ares (under aiodns) keeps its own answer cache (c-ares >= 1.23, on by default, not
configurable through pycares). It honours record TTLs (capped at 3600 s) and does not cache
SERVFAIL nor negative answers without an SOA, so it never serves anything staler than DNS
allows; it only means that a fastmta ``max_ttl`` below a record's TTL may be answered by
c-ares instead of by the server.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Sequence
from typing import Any, Literal

import aiodns
import msgspec

__all__ = ["Answer", "DnsClient", "QType", "parse_nameserver"]

QType = Literal["A", "AAAA", "MX", "TXT"]
Status = Literal["ok", "nodata", "nxdomain", "badname", "fail"]

_TYPE_CODES = {qtype: aiodns.query_type_map[qtype] for qtype in ("A", "AAAA", "MX", "TXT")}
_HAS_QUERY_DNS = hasattr(aiodns.DNSResolver, "query_dns")

# c-ares status codes (aiodns.error) that are answers rather than failures.
_STATUS_BY_ERRNO: dict[int, Status] = {
    aiodns.error.ARES_ENOTFOUND: "nxdomain",  # RCODE 3, RFC 2308 section 2.1
    aiodns.error.ARES_ENODATA: "nodata",  # NOERROR, no records of the type, RFC 2308 section 2.2
    aiodns.error.ARES_EBADNAME: "badname",  # not a valid DNS name
}


class Answer(msgspec.Struct, frozen=True):
    """The outcome of one question.

    ``values``: addresses (A, AAAA), ``(preference, exchange)`` pairs (MX, exchange
    lower-cased without the trailing dot; ``""`` is the root, i.e. a null MX) or the texts of
    the records (TXT: each record's strings joined, RFC 7208 3.3, decoded as UTF-8 with
    replacement). ``ttl``: the
    smallest TTL of the answer records, CNAMEs included (RFC 2181 section 5.2). ``detail``:
    the c-ares error text when ``status`` is ``"fail"`` (SERVFAIL, timeout, refused, ...).
    """

    status: Status
    values: tuple[Any, ...] = ()
    ttl: int = 0
    detail: str = ""


def parse_nameserver(server: str) -> str:
    """Validate ``"ip"``, ``"ip:port"`` or ``"[ipv6]:port"``; return the form c-ares takes.

    Raises ``ValueError`` for anything else (c-ares takes addresses, not names).
    """
    text = server.strip()
    port: int | None = None
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"bad nameserver {server!r}")
        port = int(rest[1:]) if rest else None
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        port = int(port_text)
    else:
        host = text
    address = ipaddress.ip_address(host)  # ValueError if not an address
    if port is not None and not 0 < port < 65536:
        raise ValueError(f"bad nameserver port in {server!r}")
    if port is None:
        return str(address)
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


class DnsClient:
    """Sends questions through aiodns and classifies the answers; no caching of its own.

    ``timeout`` is the c-ares timeout of one try, ``tries`` the number of tries per
    nameserver. A coarse deadline (``timeout * 2**tries + 1`` seconds, c-ares doubles the
    timeout per round) guards every query so nothing can wait forever. The aiodns channel
    is bound to the event loop that first uses it, and rebuilt if a later call runs in
    another loop.
    """

    def __init__(
        self, nameservers: Sequence[str] | None = None, *, timeout: float = 5.0, tries: int = 2
    ) -> None:
        if timeout <= 0 or tries < 1:
            raise ValueError("timeout must be > 0 and tries >= 1")
        self.nameservers = [parse_nameserver(s) for s in nameservers] if nameservers else None
        self.timeout = timeout
        self.tries = tries
        self.deadline = timeout * (2**tries) + 1.0
        self._dns: aiodns.DNSResolver | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _channel(self) -> aiodns.DNSResolver:
        loop = asyncio.get_running_loop()
        if self._dns is None or self._loop is not loop:
            self.close()
            self._dns = aiodns.DNSResolver(
                self.nameservers, loop=loop, timeout=self.timeout, tries=self.tries
            )
            self._loop = loop
        return self._dns

    async def query(self, name: str, qtype: QType) -> Answer:
        """Ask for the ``qtype`` records of ``name``; never raises a DNS error, returns it."""
        channel = self._channel()
        try:
            async with asyncio.timeout(self.deadline):
                if _HAS_QUERY_DNS:
                    result = await channel.query_dns(name, qtype)
                    return _from_dns_result(result, qtype)
                return _from_legacy(await channel.query(name, qtype), qtype)
        except aiodns.error.DNSError as exc:
            errno = exc.args[0] if exc.args else None
            status = _STATUS_BY_ERRNO.get(errno, "fail") if isinstance(errno, int) else "fail"
            detail = exc.args[1] if len(exc.args) > 1 else str(exc)
            return Answer(status, detail=str(detail))
        except TimeoutError:
            return Answer("fail", detail=f"no answer within {self.deadline:g} s")

    def close(self) -> None:
        """Cancel queries in flight (their callers get ``"fail"``) and release the channel."""
        dns, self._dns, self._loop = self._dns, None, None
        if dns is not None:
            dns.cancel()
            # aiodns' async close() only cancels and cleans up synchronously; dropping the
            # last reference runs the same cleanup (DNSResolver.__del__) without a loop.
            del dns

    async def aclose(self) -> None:
        """Close through aiodns' own ``close()`` (same effect as :meth:`close`)."""
        dns, self._dns, self._loop = self._dns, None, None
        if dns is not None:
            await dns.close()


def _from_dns_result(result: Any, qtype: QType) -> Answer:
    """Classify a pycares 5 ``DNSResult`` (aiodns >= 4 ``query_dns``)."""
    code = _TYPE_CODES[qtype]
    values: list[Any] = []
    ttl: int | None = None
    for record in result.answer:
        ttl = record.ttl if ttl is None else min(ttl, record.ttl)  # CNAMEs count too
        if record.type != code:
            continue
        data = record.data
        if qtype == "MX":
            values.append((int(data.priority), data.exchange.lower().rstrip(".")))
        elif qtype == "TXT":
            values.append(_text(data.data))
        else:
            values.append(data.addr)
    if not values:
        return Answer("nodata")  # e.g. a CNAME whose target has no record of this type
    return Answer("ok", tuple(values), ttl or 0)


def _from_legacy(records: Any, qtype: QType) -> Answer:
    """Classify an aiodns 3 ``query()`` result (a list of pycares 4 result objects)."""
    if qtype == "MX":
        values = tuple((int(r.priority), r.host.lower().rstrip(".")) for r in records)
    elif qtype == "TXT":
        values = tuple(_text(r.text) for r in records)
    else:
        values = tuple(r.host for r in records)
    if not values:
        return Answer("nodata")
    return Answer("ok", values, min(int(r.ttl) for r in records))


def _text(data: bytes | str) -> str:
    return data.decode("utf-8", "replace") if isinstance(data, bytes) else data
