"""Self-signed certificates for tests (needs the ``cryptography`` package)."""

from __future__ import annotations

import datetime
import ipaddress
import os

__all__ = ["make_self_signed"]


def make_self_signed(
    directory: str | os.PathLike[str], hostname: str = "localhost"
) -> tuple[str, str]:
    """Write ``<hostname>.crt`` and ``<hostname>.key`` (PEM, EC P-256) into ``directory``.

    The certificate is its own CA (so a client can trust it with ``cafile=cert``) and names
    ``hostname``, "localhost", 127.0.0.1 and ::1 in subjectAltName. Valid from one hour ago for
    ten years. The key file is mode 0600. Returns (cert_path, key_path).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    dns_names = [x509.DNSName(n) for n in dict.fromkeys([hostname, "localhost"])]
    ips = [x509.IPAddress(ipaddress.ip_address(a)) for a in ("127.0.0.1", "::1")]
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName(dns_names + ips), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    cert_path = os.path.join(directory, f"{hostname}.crt")
    key_path = os.path.join(directory, f"{hostname}.key")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return cert_path, key_path
