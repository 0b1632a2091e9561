"""fastmta.tls and fastmta.testing.certs: contexts handshake with each other over loopback."""

from __future__ import annotations

import asyncio
import os
import ssl
import stat

import pytest

from fastmta.testing.certs import make_self_signed
from fastmta.tls import client_context, server_context


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_self_signed(tmp_path_factory.mktemp("certs"), hostname="mx.test")


def test_make_self_signed_files(certs):
    from cryptography import x509

    cert_path, key_path = certs
    assert cert_path.endswith("mx.test.crt") and key_path.endswith("mx.test.key")
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    with open(cert_path, "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"mx.test", "localhost"}
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}


async def _handshake(server_ctx, client_ctx, host="127.0.0.1", server_hostname=None):
    """Start a TLS echo server on loopback, connect, exchange one line; return (version, echo)."""

    async def echo(reader, writer):
        try:
            writer.write(await reader.readline())
            await writer.drain()
        except (ssl.SSLError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(echo, host, 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=client_ctx, server_hostname=server_hostname), 5
        )
        version = writer.get_extra_info("ssl_object").version()
        writer.write(b"EHLO test\r\n")
        echo_line = await asyncio.wait_for(reader.readline(), 5)
        writer.close()
        return version, echo_line
    finally:
        server.close()
        await server.wait_closed()


def test_handshake_without_verification(certs):
    version, line = asyncio.run(_handshake(server_context(*certs), client_context(verify=False)))
    assert version in ("TLSv1.2", "TLSv1.3")
    assert line == b"EHLO test\r\n"


@pytest.mark.parametrize(
    "name, host", [("mx.test", "127.0.0.1"), ("127.0.0.1", "127.0.0.1"), ("::1", "::1")]
)
def test_handshake_with_verification(certs, name, host):
    ctx = client_context(verify=True, cafile=certs[0])
    try:
        version, line = asyncio.run(
            _handshake(server_context(*certs), ctx, host, server_hostname=name)
        )
    except OSError as e:
        if host == "::1":
            pytest.skip(f"no IPv6 loopback: {e}")
        raise
    assert line == b"EHLO test\r\n"


def test_verification_rejects_wrong_name(certs):
    ctx = client_context(verify=True, cafile=certs[0])
    with pytest.raises(ssl.SSLCertVerificationError):
        asyncio.run(_handshake(server_context(*certs), ctx, server_hostname="other.example"))


def test_verification_rejects_unknown_ca(certs, tmp_path):
    other_cert, _ = make_self_signed(tmp_path, hostname="mx.test")
    ctx = client_context(verify=True, cafile=other_cert)
    with pytest.raises(ssl.SSLCertVerificationError):
        asyncio.run(_handshake(server_context(*certs), ctx, server_hostname="mx.test"))


def test_minimum_version_is_tls12(certs):
    assert server_context(*certs).minimum_version == ssl.TLSVersion.TLSv1_2
    assert client_context(False).minimum_version == ssl.TLSVersion.TLSv1_2
    assert client_context(True).verify_mode == ssl.CERT_REQUIRED
    assert client_context(True).check_hostname
    assert client_context(False).verify_mode == ssl.CERT_NONE


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_server_refuses_tls11_client(certs):
    def tls11(ctx):
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        return ctx

    old = tls11(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    old.check_hostname = False
    old.verify_mode = ssl.CERT_NONE
    permissive = tls11(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    permissive.load_cert_chain(*certs)
    try:  # control: this client can speak TLS 1.1 to a server that allows it
        assert asyncio.run(_handshake(permissive, old))[0] == "TLSv1.1"
    except (ssl.SSLError, ConnectionError, ValueError):
        pytest.skip("this OpenSSL build cannot negotiate TLS 1.1 at all")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        asyncio.run(_handshake(server_context(*certs), old))


def test_server_context_rejects_mismatched_key(certs, tmp_path):
    _, other_key = make_self_signed(tmp_path, hostname="x.test")
    with pytest.raises(ssl.SSLError):
        server_context(certs[0], other_key)
