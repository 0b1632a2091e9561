"""An authoritative DNS server for tests and benchmarks, on loopback, built on dnslib.

It answers UDP and TCP on one port (RFC 1035 section 4.2; RFC 7766: TCP is mandatory), from an
in-memory zone that tests change while it runs. Unlike dnslib's ``ZoneResolver`` it tells
NODATA from NXDOMAIN (RFC 2308 section 2): a name that exists with other types gets NOERROR and
an empty answer; only a name that does not exist at all gets NXDOMAIN. Faults are per name:
``servfail(name)`` answers SERVFAIL (RCODE 2), ``drop(name)`` answers nothing (the client times
out). ``queries`` counts every question received, keyed by ``(name, type)``, dropped ones too.

Negative answers carry no SOA by default, so a client cache that follows RFC 2308 (c-ares' own
query cache does) cannot cache them: counts at this server then show what the cache *under
test* does. Pass ``negative_soa_ttl`` to include one.

In a test::

    with DnsTestServer() as dns:
        dns.add_mx("example.com", (10, "mx1.example.com"), (20, "mx2.example.com"))
        dns.add_a("mx1.example.com", "127.0.0.1")
        resolver = Resolver([dns.address], ...)

From a shell (zone file format: see :func:`parse_zone`)::

    python -m fastmta.testing.dnsserver --port 5353 --zone zone.txt
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ipaddress
import selectors
import socket
import struct
import threading
from collections.abc import Iterable
from types import TracebackType

from dnslib import CNAME, EDNS0, MX, QTYPE, RCODE, RR, SOA, DNSLabel, DNSRecord

__all__ = ["DnsTestServer", "parse_zone"]

# RFC 1035 section 2.3.4 / 4.2.1: a UDP message is at most 512 octets unless the query's EDNS
# OPT record (RFC 6891 section 6.2.3) advertises a larger payload; larger answers are truncated
# (TC bit) and the client repeats the query over TCP.
_UDP_PLAIN_LIMIT = 512
# Bound on one TCP message (RFC 1035 section 4.2.2: two-octet length prefix).
_TCP_MAX_MESSAGE = 65535
# Bound on the bytes buffered per TCP connection before it is closed.
_TCP_MAX_BUFFER = 2 * (_TCP_MAX_MESSAGE + 2)
# CNAME chains longer than this are answered as far as they go (loop protection).
_MAX_CNAME_CHAIN = 8


def _norm(name: str | DNSLabel) -> str:
    """Lower-case ``name`` and strip the trailing dot: the key used for every zone lookup."""
    return str(name).rstrip(".").lower()


def _qtype(rtype: str | int) -> int:
    return rtype if isinstance(rtype, int) else getattr(QTYPE, rtype.upper())


class DnsTestServer:
    """An in-memory authoritative DNS server on ``host``, UDP and TCP on the same port.

    Thread-safe: the zone may be changed from the test while the server thread answers.
    ``port`` 0 picks a free port; after :meth:`start` the real one is in ``port`` and
    ``address`` (``"127.0.0.1:PORT"``, the form :class:`fastmta.dns.Resolver` accepts).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        negative_soa_ttl: int | None = None,
        max_tcp_connections: int = 64,
    ) -> None:
        self.host = host
        self.port = port
        self.negative_soa_ttl = negative_soa_ttl
        self.max_tcp_connections = max_tcp_connections
        #: Questions received, keyed by (lower-case name without trailing dot, type name).
        self.queries: collections.Counter[tuple[str, str]] = collections.Counter()
        self._lock = threading.Lock()
        # name -> qtype -> list of RRs (rname and ttl as stored; rname rewritten when answered)
        self._zone: dict[str, dict[int, list[RR]]] = {}
        self._servfail: set[str] = set()
        self._drop: set[str] = set()
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._stopping = False

    # -- zone editing -------------------------------------------------------------------------

    @property
    def address(self) -> str:
        """``"host:port"``; IPv6 hosts are bracketed (``"[::1]:5353"``)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def set(self, name: str, rtype: str, values: Iterable[object], ttl: int = 300) -> DnsTestServer:
        """Replace the ``rtype`` records of ``name`` (an empty ``values`` removes them).

        A value is zone-file RDATA text (``"10 mx1.example.com."``, ``"127.0.0.1"``) or, for MX,
        a ``(preference, exchange)`` tuple. Names are absolute (a trailing dot is optional).
        """
        key = _norm(name)
        qtype = _qtype(rtype)
        records: list[RR] = []
        for value in values:
            if qtype == QTYPE.MX and isinstance(value, tuple):
                pref, exchange = value
                rdata = MX(_absolute(exchange), int(pref))
                records.append(RR(key + ".", qtype, ttl=ttl, rdata=rdata))
            else:
                zone_line = f"{key}. {ttl} IN {QTYPE[qtype]} {value}"
                records.extend(RR.fromZone(zone_line))
        with self._lock:
            types = self._zone.setdefault(key, {})
            if records:
                types[qtype] = records
            else:
                types.pop(qtype, None)
        return self

    def add_mx(self, domain: str, *mx: tuple[int, str], ttl: int = 300) -> DnsTestServer:
        """Set the MX records of ``domain`` to ``mx`` ``(preference, exchange)`` pairs."""
        return self.set(domain, "MX", mx, ttl)

    def add_a(self, name: str, *ips: str, ttl: int = 300) -> DnsTestServer:
        """Set the A records of ``name``."""
        return self.set(name, "A", ips, ttl)

    def add_aaaa(self, name: str, *ips: str, ttl: int = 300) -> DnsTestServer:
        """Set the AAAA records of ``name``."""
        return self.set(name, "AAAA", ips, ttl)

    def add_cname(self, name: str, target: str, ttl: int = 300) -> DnsTestServer:
        """Make ``name`` an alias of ``target`` (answers follow the chain inside this zone)."""
        return self.set(name, "CNAME", [_absolute(target)], ttl)

    def null_mx(self, domain: str, ttl: int = 300) -> DnsTestServer:
        """Publish a null MX (RFC 7505 section 3: a single ``0 .``): the domain takes no mail."""
        return self.set(domain, "MX", [(0, ".")], ttl)

    def add_name(self, name: str) -> DnsTestServer:
        """Make ``name`` exist with no records at all (every type answers NODATA)."""
        with self._lock:
            self._zone.setdefault(_norm(name), {})
        return self

    def remove(self, name: str) -> DnsTestServer:
        """Delete ``name`` and all its records: it answers NXDOMAIN from now on."""
        with self._lock:
            self._zone.pop(_norm(name), None)
        return self

    def servfail(self, name: str, on: bool = True) -> DnsTestServer:
        """Answer SERVFAIL for every question about ``name`` (``on=False`` clears it)."""
        with self._lock:
            (self._servfail.add if on else self._servfail.discard)(_norm(name))
        return self

    def drop(self, name: str, on: bool = True) -> DnsTestServer:
        """Answer nothing to questions about ``name``: the client times out."""
        with self._lock:
            (self._drop.add if on else self._drop.discard)(_norm(name))
        return self

    def count(self, name: str, rtype: str) -> int:
        """Questions received so far for ``(name, rtype)``."""
        with self._lock:
            return self.queries[(_norm(name), rtype.upper())]

    def load_zone(self, text: str) -> DnsTestServer:
        """Add the records and faults of a zone text (see :func:`parse_zone`)."""
        grouped: dict[tuple[str, str], tuple[int, list[str]]] = {}
        for directive, name, rtype, ttl, rdata in parse_zone(text):
            if directive == "servfail":
                self.servfail(name)
            elif directive == "drop":
                self.drop(name)
            else:
                _, values = grouped.setdefault((name, rtype), (ttl, []))
                values.append(rdata)
        for (name, rtype), (ttl, values) in grouped.items():
            self.set(name, rtype, values, ttl)
        return self

    # -- answering ------------------------------------------------------------------------------

    def handle(self, packet: bytes, max_size: int | None = None) -> bytes | None:
        """Answer one query packet; ``None`` means stay silent (dropped or unparsable).

        ``max_size`` is the UDP limit (``None`` for TCP): a larger answer is truncated (TC).
        """
        try:
            request = DNSRecord.parse(packet)
        except Exception:  # noqa: BLE001 - garbage in: a real server stays silent too
            return None
        edns = [rr for rr in request.ar if rr.rtype == QTYPE.OPT]
        reply = self._skeleton(request, bool(edns))
        if not request.questions:
            reply.header.rcode = RCODE.FORMERR
            return reply.pack()
        question = request.q
        name = _norm(question.qname)
        with self._lock:
            self.queries[(name, QTYPE.get(question.qtype, str(question.qtype)))] += 1
            if name in self._drop:
                return None
            if name in self._servfail:
                reply.header.rcode = RCODE.SERVFAIL
                return reply.pack()
            self._answer(reply, question.qname, question.qtype)
        data = reply.pack()
        if max_size is not None:
            limit = max(_UDP_PLAIN_LIMIT, edns[0].edns_len) if edns else _UDP_PLAIN_LIMIT
            if len(data) > limit:
                # RFC 2181 section 9: set TC and keep the question (dnslib's truncate() drops
                # it, which c-ares rejects as a malformed reply).
                truncated = self._skeleton(request, bool(edns))
                truncated.header.tc = 1
                data = truncated.pack()
        return data

    @staticmethod
    def _skeleton(request: DNSRecord, edns: bool) -> DNSRecord:
        reply = request.reply(ra=1, aa=1)
        if edns:  # RFC 6891 section 6.1.1: answer EDNS with EDNS
            reply.add_ar(EDNS0(udp_len=4096))
        return reply

    def _answer(self, reply: DNSRecord, qname: DNSLabel, qtype: int) -> None:
        """Fill ``reply`` from the zone (caller holds the lock)."""
        owner = qname
        for _ in range(_MAX_CNAME_CHAIN):
            types = self._zone.get(_norm(owner))
            if types is None:
                if owner is qname:  # RFC 2308 section 2.1: the name does not exist
                    reply.header.rcode = RCODE.NXDOMAIN
                    self._add_negative_soa(reply, qname)
                return
            wanted = types.get(qtype, ())
            if not wanted and qtype != QTYPE.CNAME and QTYPE.CNAME in types:
                alias = types[QTYPE.CNAME][0]
                if not isinstance(alias.rdata, CNAME):
                    return
                reply.add_answer(RR(owner, QTYPE.CNAME, ttl=alias.ttl, rdata=alias.rdata))
                owner = DNSLabel(str(alias.rdata.label))
                continue
            for rr in wanted:
                reply.add_answer(RR(owner, rr.rtype, ttl=rr.ttl, rdata=rr.rdata))
            if not wanted and owner is qname:  # RFC 2308 section 2.2: NODATA
                self._add_negative_soa(reply, qname)
            return

    def _add_negative_soa(self, reply: DNSRecord, qname: DNSLabel) -> None:
        if self.negative_soa_ttl is None:
            return
        ttl = self.negative_soa_ttl
        soa = SOA("ns.test.", "hostmaster.test.", (1, 3600, 600, 86400, ttl))
        zone = ".".join(str(qname).rstrip(".").split(".")[-2:]) + "."
        reply.add_auth(RR(zone, QTYPE.SOA, ttl=ttl, rdata=soa))

    # -- serving --------------------------------------------------------------------------------

    def start(self) -> DnsTestServer:
        """Bind UDP and TCP on one port and answer from a daemon thread; returns ``self``."""
        if self._thread is not None:
            raise RuntimeError("DnsTestServer already started")
        self._bind()
        self._wake_r, self._wake_w = socket.socketpair()
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name="dns-test-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread and close every socket (idempotent)."""
        if self._thread is None:
            return
        self._stopping = True
        assert self._wake_w is not None
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        self._thread.join(timeout=5)
        self._thread = None
        for sock in (self._udp, self._tcp, self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        self._udp = self._tcp = self._wake_r = self._wake_w = None

    def serve_forever(self) -> None:
        """Answer in the calling thread until interrupted (for the command line)."""
        if self._udp is None:
            self._bind()
        self._wake_r, self._wake_w = socket.socketpair()
        try:
            self._serve()
        finally:
            for sock in (self._udp, self._tcp, self._wake_r, self._wake_w):
                if sock is not None:
                    sock.close()

    def __enter__(self) -> DnsTestServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _bind(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        # Port 0: the kernel picks a free UDP port; TCP may find it taken, so try a few times.
        for _attempt in range(50):
            udp = socket.socket(family, socket.SOCK_DGRAM)
            tcp = socket.socket(family, socket.SOCK_STREAM)
            try:
                udp.bind((self.host, self.port))
                port = udp.getsockname()[1]
                tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                tcp.bind((self.host, port))
                tcp.listen(16)
            except OSError:
                udp.close()
                tcp.close()
                if self.port:
                    raise
                continue
            udp.setblocking(False)
            tcp.setblocking(False)
            self._udp, self._tcp, self.port = udp, tcp, port
            return
        raise OSError("DnsTestServer: no free port for both UDP and TCP")

    def _serve(self) -> None:
        assert self._udp is not None and self._tcp is not None and self._wake_r is not None
        buffers: dict[socket.socket, bytearray] = {}
        with selectors.DefaultSelector() as sel:
            sel.register(self._udp, selectors.EVENT_READ, "udp")
            sel.register(self._tcp, selectors.EVENT_READ, "accept")
            sel.register(self._wake_r, selectors.EVENT_READ, "wake")
            try:
                while not self._stopping:
                    for key, _ in sel.select():
                        if key.data == "wake":
                            return
                        if key.data == "udp":
                            self._on_udp()
                        elif key.data == "accept":
                            self._on_accept(sel, buffers)
                        else:
                            self._on_tcp(sel, buffers, key.fileobj)  # type: ignore[arg-type]
            finally:
                for conn in buffers:
                    conn.close()

    def _on_udp(self) -> None:
        assert self._udp is not None
        try:
            packet, peer = self._udp.recvfrom(_TCP_MAX_MESSAGE)
        except (BlockingIOError, InterruptedError):
            return
        answer = self.handle(packet, max_size=_UDP_PLAIN_LIMIT)
        if answer is not None:
            with contextlib.suppress(OSError):
                self._udp.sendto(answer, peer)

    def _on_accept(self, sel: selectors.BaseSelector, buffers: dict) -> None:
        assert self._tcp is not None
        try:
            conn, _ = self._tcp.accept()
        except (BlockingIOError, InterruptedError):
            return
        if len(buffers) >= self.max_tcp_connections:
            conn.close()
            return
        conn.setblocking(False)
        buffers[conn] = bytearray()
        sel.register(conn, selectors.EVENT_READ, "tcp")

    def _on_tcp(self, sel: selectors.BaseSelector, buffers: dict, conn: socket.socket) -> None:
        try:
            data = conn.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        buf = buffers[conn]
        buf += data
        if not data or len(buf) > _TCP_MAX_BUFFER:
            sel.unregister(conn)
            del buffers[conn]
            conn.close()
            return
        while len(buf) >= 2:
            (length,) = struct.unpack_from("!H", buf)
            if len(buf) < 2 + length:
                break
            packet = bytes(buf[2 : 2 + length])
            del buf[: 2 + length]
            answer = self.handle(packet)
            if answer is not None:
                conn.setblocking(True)  # answers are small; a blocking send keeps this simple
                conn.settimeout(2)
                with contextlib.suppress(OSError):
                    conn.sendall(struct.pack("!H", len(answer)) + answer)
                conn.setblocking(False)


def _absolute(name: str) -> str:
    return name if name.endswith(".") else name + "."


def parse_zone(text: str) -> list[tuple[str, str, str, int, str]]:
    """Parse a zone text into ``(directive, name, type, ttl, rdata)`` tuples.

    One record a line: ``NAME [TTL] TYPE RDATA`` (``example.com 300 MX 10 mx1.example.com``),
    or a fault: ``servfail NAME`` / ``drop NAME``. ``#`` and ``;`` start comments. The TTL
    defaults to 300. Directive is ``"record"``, ``"servfail"`` or ``"drop"``.
    """
    out: list[tuple[str, str, str, int, str]] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].split(";", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if parts[0].lower() in ("servfail", "drop") and len(parts) == 2:
            out.append((parts[0].lower(), parts[1], "", 0, ""))
            continue
        if len(parts) < 3:
            raise ValueError(f"zone line {lineno}: expected NAME [TTL] TYPE RDATA: {raw!r}")
        name, rest = parts[0], parts[1:]
        ttl = 300
        if rest[0].isdigit():
            ttl, rest = int(rest[0]), rest[1:]
        if rest and rest[0].upper() == "IN":
            rest = rest[1:]
        if len(rest) < 2 or rest[0].upper() not in QTYPE.reverse:
            raise ValueError(f"zone line {lineno}: unknown type or missing data: {raw!r}")
        out.append(("record", name, rest[0].upper(), ttl, " ".join(rest[1:])))
    return out


def main(argv: list[str] | None = None) -> None:
    """``python -m fastmta.testing.dnsserver --port 5353 --zone FILE``: serve until Ctrl-C."""
    parser = argparse.ArgumentParser(description="fastmta test DNS server (loopback only)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5353)
    parser.add_argument("--zone", help="zone file: NAME [TTL] TYPE RDATA, servfail NAME, drop NAME")
    args = parser.parse_args(argv)
    if not ipaddress.ip_address(args.host).is_loopback:
        parser.error("--host must be a loopback address (this is a test server)")
    server = DnsTestServer(args.host, args.port)
    if args.zone:
        with open(args.zone, encoding="utf-8") as f:
            server.load_zone(f.read())
    server._bind()
    print(f"fastmta test DNS server on {server.address} (UDP and TCP)", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()


if __name__ == "__main__":
    main()
