"""MTA Strict Transport Security (RFC 8461): a recipient domain's published promise that its MX
hosts speak TLS with certificates valid for their names.

For a domain delivered straight to its MX hosts (no relayhost, no route), before connecting:

1. the TXT record of ``_mta-sts.<domain>``: exactly one record that starts ``v=STSv1`` and names
   the policy ``id`` (section 3.1); none: no policy (or the cached one while it is valid);
2. when no policy with that id is cached: GET ``https://mta-sts.<domain>/.well-known/mta-sts.txt``
   with a certificate valid for that name, no redirects, status 200, at most 64 KiB (3.3);
3. the policy (3.2): ``mode`` enforce, testing or none, the ``mx`` patterns, ``max_age``. It
   is cached for max_age and fetched again when the TXT id changes; a failed fetch keeps the
   cached policy until it expires (5.1).

enforce: only MX hosts matching a pattern are tried, each over TLS with a certificate that
chains to a trusted CA and names the MX host (the "verify" TLS mode); with no matching host the
mail is deferred (4.7.5), never sent in clear (4.2, 5.1). testing: delivered as without a
policy; hosts that would fail are logged. none: as without a policy. KumoMTA applies MTA-STS by
default (enable_mta_sts) as fastmta does (delivery.mta_sts); Postfix needs an add-on.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import time
from collections.abc import Awaitable, Callable

import msgspec

from fastmta.dns import Destination, DnsError, Resolver
from fastmta.protocol.replies import Reply, reply

__all__ = ["MtaSts", "Policy", "enforce", "fetch_policy", "parse_policy", "parse_txt"]

log = logging.getLogger("fastmta.delivery")

MAX_POLICY_BYTES = 64 << 10  # RFC 8461 3.3: "a maximum size of 64 kilobytes"
MAX_HEADER_BYTES = 16 << 10
MAX_AGE_LIMIT = 31_557_600  # RFC 8461 3.2: at most one year
WELL_KNOWN = "/.well-known/mta-sts.txt"
_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_MODES = ("enforce", "testing", "none")


class Policy(msgspec.Struct, frozen=True):
    """A domain's MTA-STS policy (RFC 8461 3.2). ``mx``: patterns, lower-case, without a
    trailing dot; ``id``: the TXT record's id it was fetched for."""

    mode: str
    mx: tuple[str, ...]
    max_age: int
    id: str = ""

    def matches(self, host: str) -> bool:
        """RFC 8461 4.1: ``host`` is a pattern, or a pattern ``*.suffix`` covers its leftmost
        label (one label only: ``*.example.com`` matches ``mx.example.com``, not
        ``a.b.example.com`` nor ``example.com``)."""
        host = host.lower().rstrip(".")
        for pattern in self.mx:
            if pattern.startswith("*."):
                first, dot, rest = host.partition(".")
                if dot and first and rest == pattern[2:]:
                    return True
            elif host == pattern:
                return True
        return False


def parse_txt(records: tuple[str, ...] | list[str]) -> str | None:
    """The policy id of a domain's ``_mta-sts`` TXT records, or None: no valid record, or more
    than one starting with ``v=STSv1`` (RFC 8461 3.1: then there is no policy)."""
    sts = [r for r in records if r.startswith("v=STSv1")]
    if len(sts) != 1:
        return None
    fields: dict[str, str] = {}
    for part in sts[0].split(";"):
        key, eq, value = part.strip().partition("=")
        if eq:
            fields.setdefault(key.strip(), value.strip())
    if fields.get("v") != "STSv1":
        return None
    sts_id = fields.get("id", "")
    return sts_id if _ID.fullmatch(sts_id) else None


def parse_policy(text: str, sts_id: str = "") -> Policy:
    """The policy file (RFC 8461 3.2): ``key: value`` lines, CRLF or LF. Raises ValueError
    for a missing or bad version, mode or max_age, or an enforce/testing policy without mx."""
    fields: dict[str, str] = {}
    mx: list[str] = []
    for line in text.splitlines():
        key, colon, value = line.partition(":")
        if not colon:
            continue
        key, value = key.strip(), value.strip()
        if key == "mx":
            if value:
                mx.append(value.lower().rstrip("."))
        else:
            fields.setdefault(key, value)
    if fields.get("version") != "STSv1":
        raise ValueError(f"version must be STSv1, got {fields.get('version')!r}")
    mode = fields.get("mode", "")
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {', '.join(_MODES)}, got {mode!r}")
    age = fields.get("max_age", "")
    if not age.isdigit() or len(age) > 10 or int(age) > MAX_AGE_LIMIT:
        raise ValueError(f"max_age must be 0 to {MAX_AGE_LIMIT} seconds, got {age!r}")
    if not mx and mode != "none":
        raise ValueError(f"a {mode} policy needs at least one mx pattern")
    return Policy(mode, tuple(mx), int(age), sts_id)


async def fetch_policy(
    domain: str,
    resolver: Resolver,
    context: ssl.SSLContext,
    *,
    port: int = 443,
    timeout: float = 10.0,
) -> str:
    """GET the policy of ``domain`` over HTTPS (RFC 8461 3.3). The host ``mta-sts.<domain>``
    is resolved through ``resolver``; its certificate must be valid for that name under
    ``context``. Raises OSError, ssl.SSLError, TimeoutError, DnsError or ValueError (not 200,
    a redirect, not text/plain, too big, cut short, not UTF-8)."""
    host = f"mta-sts.{domain}"
    addresses = await resolver.addresses(host)
    if not addresses:
        raise ValueError(f"{host} has no address")
    async with asyncio.timeout(timeout):
        reader, writer = await _connect(addresses[:2], port, context, host)
        try:
            writer.write(
                f"GET {WELL_KNOWN} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: fastmta\r\n"
                "Accept: text/plain\r\nConnection: close\r\n\r\n".encode("ascii")
            )
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                raise ValueError("connection closed before a complete response") from None
            except asyncio.LimitOverrunError:
                raise ValueError("response header too long") from None
            status, headers = _parse_head(head)
            if status != 200:  # 3.3: redirects are not followed
                raise ValueError(f"HTTP status {status} from https://{host}{WELL_KNOWN}")
            ctype = headers.get("content-type", "text/plain").split(";")[0].strip().lower()
            if ctype != "text/plain":
                raise ValueError(f"media type {ctype!r}, not text/plain")
            body = await reader.read(MAX_POLICY_BYTES + 1)
            while body and len(body) <= MAX_POLICY_BYTES:
                more = await reader.read(MAX_POLICY_BYTES + 1 - len(body))
                if not more:
                    break
                body += more
            if len(body) > MAX_POLICY_BYTES:
                raise ValueError("policy larger than 64 KiB")
            if headers.get("transfer-encoding", "").lower() == "chunked":
                body = _dechunk(body)
        finally:
            writer.close()
    return body.decode("utf-8")


async def _connect(
    addresses: tuple[str, ...], port: int, context: ssl.SSLContext, host: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    last: Exception | None = None
    for ip in addresses:
        try:
            return await asyncio.open_connection(
                ip, port, ssl=context, server_hostname=host, limit=MAX_HEADER_BYTES
            )
        except (OSError, ssl.SSLError) as e:
            last = e
    assert last is not None
    raise last


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("iso-8859-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise ValueError(f"not an HTTP response: {lines[0][:80]!r}")
    headers = {}
    for line in lines[1:]:
        key, colon, value = line.partition(":")
        if colon:
            headers[key.strip().lower()] = value.strip()
    return int(parts[1]), headers


def _dechunk(body: bytes) -> bytes:
    out = bytearray()
    while True:
        size_line, sep, body = body.partition(b"\r\n")
        if not sep:
            raise ValueError("truncated chunked body")
        size = int(size_line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            return bytes(out)
        out += body[:size]
        body = body[size + 2 :]


Fetch = Callable[[str], Awaitable[str]]


class MtaSts:
    """Policies by domain: the TXT lookup through the resolver's cache, the fetch when the id
    is new, the policy cached for its max_age (at most ``max_entries`` domains)."""

    def __init__(
        self,
        resolver: Resolver,
        fetch: Fetch,
        *,
        clock: Callable[[], float] = time.time,
        max_entries: int = 100_000,
    ) -> None:
        self.resolver = resolver
        self.fetch = fetch
        self.clock = clock
        self.max_entries = max_entries
        self._cache: dict[str, tuple[Policy, float]] = {}

    async def policy(self, domain: str) -> Policy | None:
        """The policy that applies to ``domain`` now, or None (RFC 8461 5.1)."""
        domain = domain.lower().rstrip(".")
        now = self.clock()
        hit = self._cache.get(domain)
        cached = hit[0] if hit is not None and hit[1] > now else None
        try:
            records = await self.resolver.txt(f"_mta-sts.{domain}")
        except DnsError:  # a name the resolver refuses (too long, ...): no policy
            return cached
        sts_id = parse_txt(records) if records is not None else None
        if sts_id is None or (cached is not None and cached.id == sts_id):
            return cached  # no record (or DNS trouble): the cached policy while valid
        try:
            policy = parse_policy(await self.fetch(domain), sts_id)
        except Exception as e:  # whatever the network or the file holds: no new policy
            why = str(e) or type(e).__name__
            log.warning("MTA-STS policy of %s (id %s) not fetched: %s", domain, sts_id, why)
            return cached
        if len(self._cache) >= self.max_entries:
            self._cache.clear()
        self._cache[domain] = (policy, now + policy.max_age)
        log.info("MTA-STS policy of %s: mode %s, mx %s", domain, policy.mode, ",".join(policy.mx))
        return policy


def enforce(policy: Policy | None, domain: str, dest: Destination) -> Destination | Reply | None:
    """Apply ``policy`` to the MX hosts of ``domain``: None when it changes nothing (no policy,
    mode none or testing), the matching hosts for enforce, or the reply that defers the mail
    when no host matches."""
    if policy is None or policy.mode == "none":
        return None
    hosts = tuple(h for h in dest.hosts if policy.matches(h.name))
    if policy.mode == "testing":
        if len(hosts) < len(dest.hosts):
            bad = ", ".join(h.name for h in dest.hosts if h not in hosts)
            log.warning(
                "MTA-STS (testing) %s: MX %s not in the policy; delivered anyway", domain, bad
            )
        return None
    if not hosts:
        return reply(
            451,
            "4.7.5",
            f"MTA-STS policy of {domain} lists none of its MX hosts ({', '.join(policy.mx)})",
        )
    return msgspec.structs.replace(dest, hosts=hosts)
