"""TLS contexts for the listener (STARTTLS / implicit TLS) and for outbound delivery.

Both contexts refuse anything older than TLS 1.2 (RFC 8996 deprecates 1.0 and 1.1).
"""

from __future__ import annotations

import functools
import ssl

__all__ = ["client_context", "server_context", "shared_client_context"]


def server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """A server SSLContext with ``cert_file`` (PEM chain) and ``key_file`` loaded.

    TLS >= 1.2, no client certificates requested, no TLS compression, server cipher preference.
    Raises OSError / ssl.SSLError if the files are missing or do not match.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.load_cert_chain(cert_file, key_file)
    return ctx


@functools.cache
def shared_client_context(verify: bool, cafile: str | None = None) -> ssl.SSLContext:
    """:func:`client_context`, made once per process for each (verify, cafile) and shared by
    every connection that needs it; made on first use (loading the CA store takes ~25 ms)."""
    return client_context(verify, cafile)


def client_context(verify: bool, cafile: str | None = None) -> ssl.SSLContext:
    """An SSLContext for outbound SMTP.

    ``verify=False`` (the MX default, opportunistic TLS as in RFC 7435): encrypt, but accept any
    certificate and name. ``verify=True``: require a certificate chaining to the system CAs (or
    ``cafile`` if given) whose name matches the ``server_hostname`` passed at wrap time.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION
    if verify:
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
        if cafile:
            ctx.load_verify_locations(cafile=cafile)
        else:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx
