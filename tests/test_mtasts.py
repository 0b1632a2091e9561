"""MTA-STS (RFC 8461): the TXT record, the policy file and its fetch over HTTPS, the cache, and
delivery under enforce and testing policies against real sinks and a real HTTPS policy host on
loopback, with certificates from a test CA bundle."""

from __future__ import annotations

import asyncio
import contextlib
import ssl

import pytest
from delivery_harness import Harness

from fastmta.delivery.mtasts import MtaSts, Policy, enforce, fetch_policy, parse_policy, parse_txt
from fastmta.dns import Destination, DnsError, MXHost, Resolver
from fastmta.protocol.replies import Reply
from fastmta.testing.dnsserver import DnsTestServer
from fastmta.testing.sink import Behaviour
from fastmta.tls import client_context, server_context

pytest.importorskip("cryptography")
from fastmta.testing.certs import make_self_signed  # noqa: E402

POLICY = "version: STSv1\r\nmode: {mode}\r\n{mx}max_age: 86400\r\n"


def policy_text(mode: str = "enforce", *mx: str) -> str:
    return POLICY.format(mode=mode, mx="".join(f"mx: {m}\r\n" for m in mx))


# --- the TXT record and the policy file ----------------------------------------------------------


@pytest.mark.parametrize(
    "records, sts_id",
    [
        (["v=STSv1; id=20240101T010101"], "20240101T010101"),
        (["v=STSv1;id=abc;"], "abc"),
        (["v=spf1 -all", "v=STSv1; id=x1"], "x1"),  # other TXT records do not matter
        (["v=STSv1; id=a", "v=STSv1; id=b"], None),  # two: no policy (3.1)
        (["v=STSv1"], None),  # no id
        (["v=STSv1; id=not-alnum"], None),
        (["v=STSv1; id=" + "a" * 33], None),  # at most 32 characters
        ([], None),
    ],
)
def test_txt_record(records, sts_id):
    assert parse_txt(records) == sts_id


def test_policy_file():
    p = parse_policy(
        "version: STSv1\nmode: enforce\nmx: MX1.Example.com.\nmx: *.example.net\n"
        "max_age: 604800\nextension: ignored\n",
        "id1",
    )
    assert p == Policy("enforce", ("mx1.example.com", "*.example.net"), 604800, "id1")
    assert parse_policy("version: STSv1\r\nmode: none\r\nmax_age: 0\r\n").mx == ()


@pytest.mark.parametrize(
    "text, error",
    [
        ("mode: enforce\nmx: a\nmax_age: 1\n", "version"),
        ("version: STSv2\nmode: enforce\nmx: a\nmax_age: 1\n", "version"),
        ("version: STSv1\nmode: strict\nmx: a\nmax_age: 1\n", "mode"),
        ("version: STSv1\nmode: enforce\nmx: a\n", "max_age"),
        ("version: STSv1\nmode: enforce\nmx: a\nmax_age: 31557601\n", "max_age"),
        ("version: STSv1\nmode: enforce\nmx: a\nmax_age: -1\n", "max_age"),
        ("version: STSv1\nmode: testing\nmax_age: 10\n", "mx"),
    ],
)
def test_bad_policy_files(text, error):
    with pytest.raises(ValueError, match=error):
        parse_policy(text)


def test_mx_patterns():
    p = Policy("enforce", ("mail.example.com", "*.example.net"), 1)
    assert p.matches("mail.example.com") and p.matches("MAIL.example.com.")
    assert p.matches("mx1.example.net")
    assert not p.matches("a.b.example.net")  # a wildcard covers one label only (4.1)
    assert not p.matches("example.net")
    assert not p.matches("other.example.com")


def _dest(*names: str) -> Destination:
    hosts = tuple(MXHost(n, 10 * i, ("127.0.0.1",)) for i, n in enumerate(names))
    return Destination("example.com", ",".join(names), hosts, 1e9)


def test_enforce_keeps_only_the_named_hosts():
    dest = _dest("mx1.example.com", "backup.other.net")
    p = Policy("enforce", ("*.example.com",), 1)
    assert [h.name for h in enforce(p, "example.com", dest).hosts] == ["mx1.example.com"]
    none_match = enforce(Policy("enforce", ("mx.elsewhere.org",), 1), "example.com", dest)
    assert isinstance(none_match, Reply) and (none_match.code, none_match.enhanced) == (
        451,
        "4.7.5",
    )
    assert enforce(Policy("testing", ("mx.elsewhere.org",), 1), "example.com", dest) is None
    assert enforce(Policy("none", (), 1), "example.com", dest) is None
    assert enforce(None, "example.com", dest) is None


# --- the cache (RFC 8461 5.1) ---------------------------------------------------------------------


class FakeResolver:
    def __init__(self) -> None:
        self.records: tuple[str, ...] | None = ("v=STSv1; id=one",)

    async def txt(self, name: str):
        assert name == "_mta-sts.example.com"
        return self.records


def test_policy_cache_follows_the_txt_id():
    now = [1000.0]
    fetched: list[str] = []
    bodies = {"one": policy_text("enforce", "mx.example.com")}

    async def fetch(domain):
        fetched.append(domain)
        body = bodies.get(resolver.records[0].split("id=")[1]) if resolver.records else None
        if body is None:
            raise OSError("connection refused")
        return body

    resolver = FakeResolver()
    sts = MtaSts(resolver, fetch, clock=lambda: now[0])

    async def main():
        p = await sts.policy("Example.COM")
        assert (p.mode, p.id, fetched) == ("enforce", "one", ["example.com"])
        assert await sts.policy("example.com") == p and len(fetched) == 1  # same id: cached
        resolver.records = ()  # TXT gone: the cached policy still holds (5.1)
        assert await sts.policy("example.com") == p
        resolver.records = None  # DNS failure: likewise
        assert await sts.policy("example.com") == p
        resolver.records = ("v=STSv1; id=two",)  # new id, fetch fails: keep the cached one
        assert await sts.policy("example.com") == p and len(fetched) == 2
        bodies["two"] = policy_text("testing", "mx.example.com")
        assert (await sts.policy("example.com")).mode == "testing"  # new id fetched
        now[0] += 86401  # max_age over, and the TXT record gone: no policy any more
        resolver.records = ()
        assert await sts.policy("example.com") is None

    asyncio.run(main())


# --- the policy host over HTTPS ------------------------------------------------------------------


class PolicyHost:
    """https://mta-sts.<domain>/.well-known/mta-sts.txt on 127.0.0.1:<port>: ``response`` is
    the raw HTTP response sent to every request; ``requests`` counts them."""

    def __init__(self, cert: str, key: str, response: bytes) -> None:
        self.ctx = server_context(cert, key)
        self.response = response
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> PolicyHost:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ctx)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader, writer) -> None:
        try:
            self.requests.append(await reader.readuntil(b"\r\n\r\n"))
            writer.write(self.response)
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


def http(body: str, status: str = "200 OK", ctype: str = "text/plain") -> bytes:
    data = body.encode()
    head = f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(data)}\r\n"
    return (head + "\r\n").encode() + data


@pytest.fixture
def certs(tmp_path):
    """The policy host's and the MX host's certificates, and a CA bundle trusting both."""
    d = tmp_path / "certs"
    web = make_self_signed(d, "mta-sts.example.test")
    mx = make_self_signed(d, "mx1.example.test")
    stranger = make_self_signed(d, "stranger.test")  # not in the bundle
    bundle = d / "ca.pem"
    bundle.write_bytes(open(web[0], "rb").read() + open(mx[0], "rb").read())
    return {"web": web, "mx": mx, "stranger": stranger, "bundle": str(bundle)}


@contextlib.asynccontextmanager
async def policy_fetcher(cert: tuple[str, str], bundle: str, response: bytes):
    """A policy host for mta-sts.example.test with ``cert``, the DNS test server that names
    it, and ``fetch(domain)`` trusting ``bundle``; yields (fetch, host, dns, resolver)."""
    host = await PolicyHost(*cert, response).start()
    with DnsTestServer() as dns:
        dns.add_a("mta-sts.example.test", "127.0.0.1")
        resolver = Resolver([dns.address], timeout=1, tries=1)
        ctx = client_context(True, bundle)

        def fetch(domain: str):
            return fetch_policy(domain, resolver, ctx, port=host.port)

        try:
            yield fetch, host, dns, resolver
        finally:
            host.close()
            resolver.close()


@pytest.mark.parametrize(
    "response, error",
    [
        (http(policy_text("enforce", "mx1.example.test")), None),
        (
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"%x\r\n%s\r\n0\r\n\r\n"
            % (
                len(policy_text("enforce", "mx1.example.test")),
                policy_text("enforce", "mx1.example.test").encode(),
            ),
            None,
        ),
        (http("gone", "404 Not Found"), "HTTP status 404"),
        (
            b"HTTP/1.1 301 Moved\r\nLocation: https://elsewhere.test/\r\nContent-Length: 0\r\n\r\n",
            "HTTP status 301",  # 3.3: no redirects
        ),
        (http("<html>", ctype="text/html"), "text/plain"),
        (http("x" * (65 << 10)), "64 KiB"),
        (b"HTTP/1.1 200 OK\r\nContent-Type: text/pl", "cut short|closed before"),
        (b"HTTP/1.1 200 OK\r\nX-Filler: " + b"y" * (20 << 10) + b"\r\n\r\n", "too long"),
        (b"SSH-2.0-OpenSSH\r\n\r\n", "not an HTTP response"),
    ],
)
def test_fetch_over_https(certs, response, error):
    async def main():
        async with policy_fetcher(certs["web"], certs["bundle"], response) as (fetch, host, _, _):
            if error is None:
                assert parse_policy(await fetch("example.test")).mx == ("mx1.example.test",)
                assert host.requests[0].startswith(b"GET /.well-known/mta-sts.txt HTTP/1.")
                assert b"\r\nHost: mta-sts.example.test\r\n" in host.requests[0]
            else:
                with pytest.raises(ValueError, match=error):
                    await fetch("example.test")

    asyncio.run(main())


def test_fetch_refuses_a_certificate_for_another_name(certs):
    async def main():
        body = http(policy_text("enforce", "mx1.example.test"))
        fetcher = policy_fetcher(certs["stranger"], certs["bundle"], body)
        async with fetcher as (fetch, _, dns, resolver):
            with pytest.raises(ssl.SSLError):
                await fetch("example.test")
            dns.remove("mta-sts.example.test")
            resolver.clear_cache()
            with pytest.raises((ValueError, DnsError)):
                await fetch("example.test")

    asyncio.run(main())


# --- delivery ------------------------------------------------------------------------------------


def run_delivery(
    tmp_path,
    certs,
    policy: str,
    sink: str,
    mx_hosts=None,
    txt=True,
    extra_sinks=None,
    domains: dict | None = None,
):
    """One message to u@example.test whose MX mx1.example.test (127.0.0.2) is a sink that
    offers STARTTLS with a certificate from the bundle (``tls``), one for another name
    (``stranger``) or no STARTTLS (``plain``). Returns the delivery log's attempt lines, the
    policy host's requests and the connections each sink accepted. ``domains``: the
    [domain."x"] sections of the configuration."""
    mx_cert = {"tls": certs["mx"], "stranger": certs["stranger"]}.get(sink)
    behaviour = (
        Behaviour(starttls=True, cert=mx_cert[0], key=mx_cert[1]) if mx_cert else Behaviour()
    )
    sinks = {"127.0.0.2": behaviour, **(extra_sinks or {})}

    async def main():
        host = await PolicyHost(*certs["web"], http(policy)).start()
        overrides = {
            "delivery": {"tls_ca_file": certs["bundle"], "mta_sts_port": host.port},
            "domain": domains or {},
        }
        try:
            async with Harness(tmp_path, sinks, overrides=overrides) as h:
                hosts = mx_hosts or [(10, "mx1.example.test", "127.0.0.2")]
                h.mx("example.test", *hosts)
                h.dns.add_a("mta-sts.example.test", "127.0.0.1")
                if txt:
                    h.dns.set("_mta-sts.example.test", "TXT", ['"v=STSv1; id=20261130"'])
                await h.send("a@sender.test", ["u@example.test"])
                await h.until(lambda: len(h.records()) >= 1)
                connections = {ip: s.connections for ip, s in h.sinks.items()}
                return h.records(), host.requests, connections
        finally:
            host.close()

    return asyncio.run(main())


def test_enforce_delivers_over_verified_tls(tmp_path, certs):
    recs, requests, _ = run_delivery(
        tmp_path, certs, policy_text("enforce", "*.example.test"), "tls"
    )
    assert [(r["outcome"], r["tls"], r["mx"]) for r in recs] == [
        ("delivered", True, "mx1.example.test")
    ]
    assert len(requests) == 1


@pytest.mark.parametrize(
    "sink, why",
    [
        ("plain", "does not offer STARTTLS"),  # never in clear under enforce
        ("stranger", "handshake failed"),  # a certificate that does not verify: no fallback
    ],
)
def test_enforce_defers_without_valid_tls(tmp_path, certs, sink, why):
    recs, _, _ = run_delivery(tmp_path, certs, policy_text("enforce", "mx1.example.test"), sink)
    assert [(r["outcome"], r["code"], r["enhanced"]) for r in recs] == [("deferred", 451, "4.7.5")]
    assert why in recs[0]["text"]


def test_enforce_defers_when_no_mx_host_is_named(tmp_path, certs):
    recs, _, _ = run_delivery(tmp_path, certs, policy_text("enforce", "mx.elsewhere.test"), "tls")
    assert [(r["outcome"], r["code"], r["enhanced"]) for r in recs] == [("deferred", 451, "4.7.5")]
    assert "lists none of its MX hosts" in recs[0]["text"]


def test_enforce_skips_mx_hosts_the_policy_does_not_name(tmp_path, certs):
    """A more preferred MX host missing from the policy (a live server, as an attacker who
    forged the MX records would run) is never connected to."""
    hosts = [(5, "rogue.attacker.test", "127.0.0.3"), (10, "mx1.example.test", "127.0.0.2")]
    recs, _, conns = run_delivery(
        tmp_path,
        certs,
        policy_text("enforce", "mx1.example.test"),
        "tls",
        mx_hosts=hosts,
        extra_sinks={"127.0.0.3": Behaviour()},
    )
    assert [(r["outcome"], r["mx"]) for r in recs] == [("delivered", "mx1.example.test")]
    assert conns == {"127.0.0.2": 1, "127.0.0.3": 0}


def test_testing_mode_and_no_policy_deliver_as_usual(tmp_path, certs):
    recs, _, _ = run_delivery(
        tmp_path / "testing", certs, policy_text("testing", "mx.elsewhere.test"), "plain"
    )
    assert [(r["outcome"], r["tls"]) for r in recs] == [("delivered", False)]
    recs, requests, _ = run_delivery(
        tmp_path / "none", certs, policy_text("enforce", "mx.elsewhere.test"), "plain", txt=False
    )
    assert [(r["outcome"], r["tls"]) for r in recs] == [("delivered", False)]
    assert requests == []  # no TXT record: no fetch


def test_mta_sts_can_be_switched_off_per_domain(tmp_path, certs):
    off = {"example.test": {"mta_sts": False}}
    recs, requests, _ = run_delivery(
        tmp_path, certs, policy_text("enforce", "x.test"), "plain", domains=off
    )
    assert [(r["outcome"], r["tls"]) for r in recs] == [("delivered", False)]
    assert requests == []


@pytest.mark.parametrize("sink, outcome", [("tls", "delivered"), ("stranger", "deferred")])
def test_tls_verify_mode_on_its_own(tmp_path, certs, sink, outcome):
    """delivery.tls = "verify" (here per domain, no MTA-STS): TLS with a certificate that
    chains to the CA bundle and names the MX host, or the mail waits (Postfix "verify")."""
    cert = certs["mx"] if sink == "tls" else certs["stranger"]

    async def main():
        overrides = {
            "delivery": {"tls_ca_file": certs["bundle"]},
            "domain": {"example.test": {"tls": "verify"}},
        }
        sinks = {"127.0.0.2": Behaviour(starttls=True, cert=cert[0], key=cert[1])}
        async with Harness(tmp_path, sinks, overrides=overrides) as h:
            h.mx("example.test", (10, "mx1.example.test", "127.0.0.2"))
            await h.send("a@sender.test", ["u@example.test"])
            await h.until(lambda: len(h.records()) >= 1)
            return h.records()

    recs = asyncio.run(main())
    assert [(r["outcome"], r["tls"]) for r in recs] == [(outcome, outcome == "delivered")]
