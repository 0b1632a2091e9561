"""fastmta.testing.dnsserver: the loopback DNS server the DNS tests rely on, checked with dnslib."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest
from dnslib import QTYPE, RCODE, DNSRecord

from fastmta.testing.dnsserver import DnsTestServer, parse_zone


@pytest.fixture
def dns() -> Iterator[DnsTestServer]:
    with DnsTestServer() as server:
        yield server


def ask(
    server: DnsTestServer | tuple[str, int], name: str, qtype: str, *, tcp: bool = False
) -> DNSRecord:
    host, port = (server.host, server.port) if isinstance(server, DnsTestServer) else server
    packet = DNSRecord.question(name, qtype).send(host, port, tcp=tcp, timeout=2)
    return DNSRecord.parse(packet)


def test_answer_nodata_and_nxdomain(dns):
    dns.add_a("host.test", "127.0.0.1", ttl=42)
    answer = ask(dns, "HOST.test", "A")
    assert answer.header.rcode == RCODE.NOERROR
    assert [(str(rr.rdata), rr.ttl) for rr in answer.rr] == [("127.0.0.1", 42)]
    nodata = ask(dns, "host.test", "MX")  # the name exists with another type
    assert nodata.header.rcode == RCODE.NOERROR and not nodata.rr
    nx = ask(dns, "other.test", "MX")
    assert nx.header.rcode == RCODE.NXDOMAIN and not nx.rr
    assert dns.count("host.test", "A") == 1 and dns.queries[("other.test", "MX")] == 1


def test_negative_soa_is_optional(dns):
    assert not ask(dns, "nx.test", "A").auth
    dns.negative_soa_ttl = 60
    soa = ask(dns, "nx.test", "A").auth
    assert len(soa) == 1 and soa[0].rtype == QTYPE.SOA


def test_mx_null_mx_and_cname(dns):
    dns.add_mx("mail.test", (10, "mx1.mail.test"), (20, "mx2.mail.test"))
    dns.null_mx("nomail.test")
    dns.add_cname("www.mail.test", "mx1.mail.test")
    dns.add_a("mx1.mail.test", "127.0.0.5")
    mx = ask(dns, "mail.test", "MX")
    assert sorted((rr.rdata.preference, str(rr.rdata.label)) for rr in mx.rr) == [
        (10, "mx1.mail.test."),
        (20, "mx2.mail.test."),
    ]
    null = ask(dns, "nomail.test", "MX").rr
    assert [(rr.rdata.preference, str(rr.rdata.label)) for rr in null] == [(0, ".")]
    chain = ask(dns, "www.mail.test", "A").rr
    assert [QTYPE[rr.rtype] for rr in chain] == ["CNAME", "A"]
    assert str(chain[1].rdata) == "127.0.0.5"


def test_runtime_changes(dns):
    dns.add_a("change.test", "127.0.0.1")
    dns.add_a("change.test", "127.0.0.2", "127.0.0.3")
    assert [str(rr.rdata) for rr in ask(dns, "change.test", "A").rr] == ["127.0.0.2", "127.0.0.3"]
    dns.set("change.test", "A", [])
    assert ask(dns, "change.test", "A").header.rcode == RCODE.NOERROR  # still exists: NODATA
    dns.remove("change.test")
    assert ask(dns, "change.test", "A").header.rcode == RCODE.NXDOMAIN


def test_servfail_and_drop(dns):
    dns.add_a("sf.test", "127.0.0.1")
    dns.servfail("sf.test")
    assert ask(dns, "sf.test", "A").header.rcode == RCODE.SERVFAIL
    dns.servfail("sf.test", on=False)
    assert ask(dns, "sf.test", "A").header.rcode == RCODE.NOERROR
    dns.drop("quiet.test")
    with pytest.raises(socket.timeout):
        DNSRecord.question("quiet.test", "A").send(dns.host, dns.port, timeout=0.3)
    assert dns.count("quiet.test", "A") == 1  # dropped questions are counted too


def test_udp_truncation_and_tcp(dns):
    ips = [f"127.2.0.{i}" for i in range(1, 101)]
    dns.add_a("big.test", *ips)
    udp = ask(dns, "big.test", "A")
    assert udp.header.tc == 1 and not udp.rr and udp.q.qname == "big.test"
    tcp = ask(dns, "big.test", "A", tcp=True)
    assert tcp.header.tc == 0 and [str(rr.rdata) for rr in tcp.rr] == ips


def test_tcp_connection_carries_several_queries(dns):
    dns.add_a("a.test", "127.0.0.1")
    with socket.create_connection((dns.host, dns.port), timeout=2) as conn:
        for qid in (1, 2):
            query = DNSRecord.question("a.test", "A")
            query.header.id = qid
            packet = query.pack()
            conn.sendall(len(packet).to_bytes(2, "big") + packet)
        replies = []
        buf = b""
        while len(replies) < 2:
            buf += conn.recv(4096)
            while len(buf) >= 2 and len(buf) >= 2 + int.from_bytes(buf[:2], "big"):
                size = int.from_bytes(buf[:2], "big")
                replies.append(DNSRecord.parse(buf[2 : 2 + size]))
                buf = buf[2 + size :]
    assert [r.header.id for r in replies] == [1, 2]


def test_garbage_is_ignored_and_server_keeps_answering(dns):
    dns.add_a("ok.test", "127.0.0.1")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(b"\x00\x01garbage", (dns.host, dns.port))
    assert ask(dns, "ok.test", "A").rr


def test_stop_releases_the_port():
    server = DnsTestServer().start()
    port = server.port
    server.stop()
    server.stop()  # idempotent
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", port))


ZONE = """
; comment
example.test        MX 10 mx.example.test.   # trailing comment
example.test  60 IN MX 20 mx2.example.test.
mx.example.test  120 A 127.0.0.1
mx.example.test      AAAA ::1
servfail bad.test
drop slow.test
"""


def test_parse_zone():
    rows = parse_zone(ZONE)
    assert rows[0] == ("record", "example.test", "MX", 300, "10 mx.example.test.")
    assert rows[1] == ("record", "example.test", "MX", 60, "20 mx2.example.test.")
    assert rows[2] == ("record", "mx.example.test", "A", 120, "127.0.0.1")
    assert rows[-2:] == [("servfail", "bad.test", "", 0, ""), ("drop", "slow.test", "", 0, "")]
    with pytest.raises(ValueError):
        parse_zone("example.test 300 BOGUS x")


def test_command_line_server(tmp_path):
    zone = tmp_path / "zone.txt"
    zone.write_text(ZONE)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    cmd = [sys.executable, "-m", "fastmta.testing.dnsserver", "--port", str(port)]
    with subprocess.Popen(
        [*cmd, "--zone", str(zone)], stdout=subprocess.PIPE, text=True, env=env
    ) as proc:
        try:
            assert proc.stdout is not None
            assert f"127.0.0.1:{port}" in proc.stdout.readline()  # printed once bound
            mx = ask(("127.0.0.1", port), "example.test", "MX")
            assert sorted(rr.rdata.preference for rr in mx.rr) == [10, 20]
            assert ask(("127.0.0.1", port), "bad.test", "A").header.rcode == RCODE.SERVFAIL
        finally:
            proc.terminate()
            proc.wait(timeout=5)


def test_command_line_refuses_non_loopback():
    result = subprocess.run(
        [sys.executable, "-m", "fastmta.testing.dnsserver", "--host", "0.0.0.0", "--port", "0"],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=os.getcwd()),
        timeout=20,
    )
    assert result.returncode != 0 and "loopback" in result.stderr
