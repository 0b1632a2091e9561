"""DKIM signing (fastmta/dkim.py): RFC 6376's canonicalization examples, signatures checked
by an independent verifier (dkimpy, with the public key handed to it instead of DNS), the
choice of signer, config errors, and the three ways mail comes in: SMTP from a trusted client
(`fastmta serve`), `fastmta send`, and the Python API."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import smtplib
import subprocess
import sys
import time

import pytest

dkim = pytest.importorskip("dkim")  # dkimpy, the independent verifier
serialization = pytest.importorskip("cryptography.hazmat.primitives.serialization")
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa  # noqa: E402

from fastmta.api import MTA  # noqa: E402
from fastmta.config import ConfigError, check_dkim_keys, load_config  # noqa: E402
from fastmta.dkim import Signer, Signers, canon_body, canon_header, load_key  # noqa: E402
from fastmta.protocol.parse import dot_stuff  # noqa: E402
from fastmta.protocol.replies import reply  # noqa: E402
from fastmta.testing.sink import Behaviour, Sink, unused_port  # noqa: E402
from fastmta.testing.smtpd import ThreadedSmtpd  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MESSAGE = (
    b'From: "Shop, Inc" <news@Mail.Example.COM>\r\n'
    b"To: a@x.test,\r\n\tb@y.test\r\n"
    b"To: c@z.test\r\n"
    b"Subject:  Your   order \t\r\n"
    b"Date: Mon, 30 Nov 2026 10:00:00 +0000\r\n"
    b"Message-ID: <1@mail.example.com>\r\n"
    b"X-Not-Signed: 1\r\n"
    b"\r\n"
    b"Hello  there \t\r\n"
    b".a line that starts with a dot\r\n"
    b"\r\n"
    b"bye\r\n"
    b"\r\n\r\n"
)


def pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def dns_record(key) -> bytes:
    """The TXT record a domain publishes for ``key`` (RFC 6376 3.6.1, RFC 8463 4)."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return b"v=DKIM1; k=ed25519; p=" + base64.b64encode(raw)
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)


def verify(message: bytes, key, selector: str = "s1", domain: str = "example.com") -> bool:
    """dkimpy's verdict on ``message`` (as the recipient sees it: no dot-stuffing)."""
    want = f"{selector}._domainkey.{domain}.".encode()

    def dnsfunc(name, timeout=5):
        return dns_record(key) if name in (want, want.decode()) else None

    return dkim.verify(message, dnsfunc=dnsfunc)


@pytest.fixture(scope="module")
def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ed_key():
    return ed25519.Ed25519PrivateKey.generate()


# --------------------------------------------------------------------------- the algorithm


def test_canonicalization_examples_of_rfc6376_3_4_5():
    assert canon_header(b"A: X\r\n", True) + canon_header(b"B : Y\t\r\n\tZ  \r\n", True) == (
        b"a:X\r\nb:Y Z\r\n"
    )
    assert canon_header(b"B : Y\t\r\n\tZ  \r\n", False) == b"B : Y\t\r\n\tZ  \r\n"
    body = b" C \r\nD \t E\r\n\r\n\r\n"
    assert canon_body(body, True) == b" C\r\nD E\r\n"
    assert canon_body(body, False) == b" C \r\nD \t E\r\n"
    assert canon_body(b"", True) == b"" and canon_body(b"", False) == b"\r\n"
    assert canon_body(b"\r\n\r\n", False) == b"\r\n" and canon_body(b"x", True) == b"x\r\n"


@pytest.mark.parametrize("canon", ["relaxed/relaxed", "relaxed/simple", "simple/relaxed",
                                   "simple/simple"])  # fmt: skip
@pytest.mark.parametrize("which", ["rsa", "ed25519"])
def test_signatures_verify_with_an_independent_verifier(canon, which, rsa_key, ed_key):
    key = rsa_key if which == "rsa" else ed_key
    signer = Signer("example.com", "s1", *load_key(pem(key)), canonicalization=canon)
    assert signer.algorithm == ("rsa-sha256" if which == "rsa" else "ed25519-sha256")
    wire = dot_stuff(MESSAGE, terminate=False)
    field = signer.sign(wire)
    assert field.startswith(b"DKIM-Signature: v=1; a=") and field.endswith(b"\r\n")
    assert all(len(line) <= 78 for line in field.split(b"\r\n"))
    assert f"c={canon};".encode() in field.replace(b"\r\n\t", b" ")
    # h=: both To fields, From once more than it occurs, nothing that is not in the list
    assert b"h=from:from:subject:date:to:to:message-id;" in field.replace(b"\r\n\t", b" ")
    assert verify(field + MESSAGE, key)
    assert not verify(field + MESSAGE.replace(b"bye", b"Bye"), key)  # body hash
    assert not verify(field + MESSAGE.replace(b"order", b"Order"), key)  # a signed header
    assert not verify(field + b"From: evil@example.com\r\n" + MESSAGE, key)  # oversigned
    assert verify(field + b"X-Added: later\r\n" + MESSAGE, key)  # unsigned fields may come


def test_the_signer_is_chosen_by_the_from_domain(rsa_key, ed_key):
    a = Signer("example.com", "s1", *load_key(pem(rsa_key)))
    b = Signer("other.test", "s2", *load_key(pem(ed_key)))
    signers = Signers([a, b])
    assert signers.for_message(MESSAGE) is a  # mail.example.com: the parent's key
    assert signers.for_message(b"From: x@OTHER.test.\r\n\r\nhi\r\n") is b
    assert signers.for_message(b"From: x@example.com.evil.test\r\n\r\nhi\r\n") is None
    assert signers.for_message(b"Subject: no from\r\n\r\nhi\r\n") is None
    assert not Signers() and Signers().for_message(MESSAGE) is None


def test_bad_keys_are_explained():
    with pytest.raises(ValueError, match="not an unencrypted PEM private key"):
        load_key(b"-----BEGIN NOTHING-----\n")
    p256 = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(ValueError, match="DKIM signs with RSA or Ed25519 keys"):
        load_key(pem(p256))


def _config_text(tmp_path, key_file: str, extra: str = "") -> str:
    path = tmp_path / "f.toml"
    path.write_text(
        f'[[dkim]]\ndomain = "example.com"\nselector = "s1"\nkey_file = "{key_file}"\n{extra}'
    )
    return str(path)


def test_config_errors_name_the_key(tmp_path, rsa_key):
    good = tmp_path / "k.pem"
    good.write_bytes(pem(rsa_key))
    with pytest.raises(ConfigError, match=r"dkim\[0\].key_file: file not found"):
        load_config(_config_text(tmp_path, str(tmp_path / "absent.pem")))
    with pytest.raises(ConfigError, match=r"dkim\[0\].canonicalization"):
        load_config(_config_text(tmp_path, str(good), 'canonicalization = "loose"\n'))
    with pytest.raises(ConfigError, match=r"dkim\[0\].headers: must include \"from\""):
        load_config(_config_text(tmp_path, str(good), 'headers = ["subject"]\n'))
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key\n")
    config = load_config(_config_text(tmp_path, str(bad)))  # exists: only serve reads it
    with pytest.raises(ConfigError, match=r"dkim\[0\].key_file: .*not an unencrypted PEM"):
        check_dkim_keys(config)
    r = subprocess.run(
        [sys.executable, "-m", "fastmta.cli", "config", "--check", _config_text(tmp_path, str(bad))],
        capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), timeout=60,
    )  # fmt: skip
    assert r.returncode == 2 and "dkim[0].key_file" in r.stderr and "Traceback" not in r.stderr


# --------------------------------------------------------------------------- the ways in


def _wait(sink: Sink, n: int) -> None:
    assert sink.wait_for(n, 15), f"the sink has {sink.count} of {n}"


def test_serve_signs_for_trusted_clients_only_send_and_dsns_too(tmp_path, rsa_key, ed_key):
    key_file = tmp_path / "example.com.pem"
    key_file.write_bytes(pem(rsa_key))
    host_key = tmp_path / "mta.test.pem"
    host_key.write_bytes(pem(ed_key))
    port = unused_port()
    refuse = Behaviour(
        rcpt_reply=lambda a: reply(550, "5.1.1", "no such user") if a.startswith("bad@") else None
    )
    with Sink(behaviour=refuse) as sink:
        cfg = tmp_path / "fastmta.toml"
        cfg.write_text(
            f'[server]\nhostname = "mta.test"\nworkers = 1\nspool_dir = "{tmp_path}/spool"\n'
            f'log_file = "{tmp_path}/log"\n'
            f'[[listener]]\naddress = "127.0.0.1:{port}"\n'
            f'[policy]\nmynetworks = ["127.0.0.9/32"]\nlocal_domains = ["local.test"]\n'
            f'[local]\nmaildir_root = "{tmp_path}/maildir"\n'
            f'[delivery]\nrelayhost = "[127.0.0.1]:{sink.port}"\ntls = "none"\n'
            f'[[dkim]]\ndomain = "example.com"\nselector = "s1"\nkey_file = "{key_file}"\n'
            f'[[dkim]]\ndomain = "mta.test"\nselector = "s2"\nkey_file = "{host_key}"\n'
        )
        env = dict(os.environ, PYTHONPATH=ROOT)
        proc = subprocess.Popen(
            [sys.executable, "-m", "fastmta.cli", "serve", "--config", str(cfg)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=ROOT,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    smtplib.SMTP("127.0.0.1", port, timeout=5).quit()
                    break
                except OSError:
                    assert proc.poll() is None and time.monotonic() < deadline
                    time.sleep(0.1)
            # a trusted client (mynetworks) relaying: signed; the one refused comes back in
            # a DSN from MAILER-DAEMON@mta.test, signed with that domain's key
            with smtplib.SMTP("127.0.0.1", port, source_address=("127.0.0.9", 0)) as s:
                s.sendmail("news@example.com", ["r@y.test"], MESSAGE)
                s.sendmail("news@example.com", ["bad@y.test"], MESSAGE)
            # anyone sending to a local domain: not signed (it is not our users' mail)
            with smtplib.SMTP("127.0.0.1", port) as s:
                s.sendmail("news@example.com", ["u@local.test"], MESSAGE)
            # fastmta send: signed
            r = subprocess.run(
                [sys.executable, "-m", "fastmta.cli", "send", "--config", str(cfg), "-f",
                 "news@example.com", "s@y.test"],
                input=MESSAGE.replace(b"\r\n", b"\n"), capture_output=True, env=env, cwd=ROOT,
                timeout=60,
            )  # fmt: skip
            assert r.returncode == 0, r.stderr
            _wait(sink, 3)
        finally:
            proc.terminate()
            proc.wait(20)
    got = {m.recipients[0]: m.data for m in sink.messages}
    for rcpt in ("r@y.test", "s@y.test"):
        assert got[rcpt].startswith(b"DKIM-Signature: "), got[rcpt][:200]
        assert verify(got[rcpt], rsa_key)
    dsn = got["news@example.com"]
    assert b"MAILER-DAEMON@mta.test" in dsn and verify(dsn, ed_key, "s2", "mta.test")
    local = os.path.join(tmp_path, "maildir", "local.test", "u", "new")
    (name,) = os.listdir(local)
    with open(os.path.join(local, name), "rb") as f:
        assert b"DKIM-Signature" not in f.read()


def test_api_submit_signs(tmp_path, ed_key):
    key_file = tmp_path / "k.pem"
    key_file.write_bytes(pem(ed_key))
    with Sink() as sink:
        config = {
            "server": {"spool_dir": str(tmp_path / "spool"), "hostname": "embed.test"},
            "delivery": {"relayhost": f"[127.0.0.1]:{sink.port}"},
            "dkim": [{"domain": "example.com", "selector": "s1", "key_file": str(key_file)}],
        }

        async def main():
            async with MTA(config, listen=False) as mta:
                await mta.submit("news@example.com", ["u@b.test"], MESSAGE)
                for _ in range(300):
                    if sink.count:
                        break
                    await asyncio.sleep(0.02)

        asyncio.run(main())
    (m,) = sink.messages
    assert b"a=ed25519-sha256;" in m.data and verify(m.data, ed_key)


def test_a_signing_failure_answers_451_and_queues_nothing(tmp_path):
    class BrokenKey:
        def sign(self, *args):
            raise RuntimeError("the key went away")

    signers = Signers([Signer("example.com", "s1", BrokenKey(), "rsa-sha256")])
    d = ThreadedSmtpd(str(tmp_path / "spool"), setup=lambda ctx: setattr(ctx, "dkim", signers))
    d.start()
    try:
        with smtplib.SMTP("127.0.0.1", d.port) as c:  # 127.0.0.1: in mynetworks, trusted
            c.ehlo("x")
            c.mail("news@example.com")
            c.rcpt("r@y.test")
            assert c.data(MESSAGE) == (451, b"4.3.0 Message could not be signed, try again later")
            # the session goes on; mail the key does not sign is taken
            c.sendmail("a@b.test", ["r@y.test"], b"From: a@b.test\r\n\r\nhi\r\n")
    finally:
        d.stop()
    assert len(d.submitted) == 1


def test_dkim_keygen_and_records_print_the_dns_record(tmp_path):
    out = tmp_path / "k.pem"
    env = dict(os.environ, PYTHONPATH=ROOT)

    def cli(*args):
        return subprocess.run(
            [sys.executable, "-m", "fastmta.cli", "dkim", *args],
            capture_output=True, text=True, cwd=ROOT, env=env, timeout=60,
        )  # fmt: skip

    r = cli("keygen", "Example.COM", "s9", "--out", str(out), "--type", "ed25519")
    assert r.returncode == 0, r.stderr
    assert os.stat(out).st_mode & 0o777 == 0o600
    key, algorithm = load_key(out.read_bytes())
    assert algorithm == "ed25519-sha256"
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("s9._domainkey.example.com."))
    record = "".join(line.split("( ")[1].rsplit(" )")[0].replace('" "', "").strip('"'))
    assert record.encode() == dns_record(key)  # the test's own encoding of the public key
    assert f'[[dkim]]\ndomain = "example.com"\nselector = "s9"\nkey_file = "{out}"' in r.stdout
    assert cli("keygen", "example.com", "s9", "--out", str(out)).returncode == 64  # kept

    cfg = tmp_path / "f.toml"
    cfg.write_text(r.stdout.split("# add to the configuration:\n")[1])
    r2 = cli("records", "--config", str(cfg))
    assert r2.returncode == 0 and r2.stdout.strip() == line
    rsa_out = tmp_path / "r.pem"
    r3 = cli("keygen", "example.com", "s1", "--out", str(rsa_out), "--bits", "1024")
    assert r3.returncode == 0 and load_key(rsa_out.read_bytes())[1] == "rsa-sha256"
    line2 = next(ln for ln in r.stdout.splitlines() + r3.stdout.splitlines() if "k=rsa" in ln)
    assert all(len(x) <= 255 for x in re.findall(r'"([^"]*)"', line2))  # TXT string limit
    big = tmp_path / "big.pem"
    r4 = cli("keygen", "example.com", "s2", "--out", str(big), "--bits", "4096")
    strings = re.findall(r'"([^"]*)"', r4.stdout.splitlines()[1])
    assert len(strings) >= 3 and all(len(x) <= 255 for x in strings)
    assert cli("keygen", "not a domain", "s1", "--out", str(tmp_path / "x")).returncode == 64
