"""fastmta.auth: scrypt users file, verification, set_password, SASL PLAIN, LOGIN, SCRAM-SHA-256."""

from __future__ import annotations

import base64
import os
import stat
import time

import pytest
from scram_client import ScramClient

from fastmta import auth
from fastmta.auth import (
    AUTH_FAILED,
    SaslChallenge,
    SaslDone,
    SaslError,
    SaslVerified,
    Users,
    UsersFileError,
    failure_delay,
    hash_password,
    scram_keys,
    set_password,
    start,
)


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


# --------------------------------------------------------------------------- hashing and users


def test_hash_format_and_salt():
    h1, h2 = hash_password("secret"), hash_password("secret")
    assert h1 != h2  # random salt
    parts = h1.split("$")
    assert parts[:4] == ["scrypt", "16384", "8", "1"]
    assert len(base64.b64decode(parts[4])) == 16 and len(base64.b64decode(parts[5])) == 32


def test_users_file_verify(tmp_path):
    path = tmp_path / "users"
    path.write_text(
        "# fastmta users\n\n"
        f"alice:{hash_password('wonderland')}\n"
        f"  bob:{hash_password('pässwörd')}  \n"
    )
    users = Users(str(path))
    assert len(users) == 2 and "alice" in users and "bob" in users
    assert users.verify("alice", "wonderland")
    assert not users.verify("alice", "Wonderland")
    assert not users.verify("alice", "")
    assert users.verify("bob", "pässwörd")
    assert not users.verify("carol", "wonderland")
    assert not users.verify("# fastmta users", "x")


def test_unknown_user_costs_comparable_time(tmp_path):
    path = tmp_path / "users"
    path.write_text(f"alice:{hash_password('pw')}\n")
    users = Users(str(path))

    def cost(user):
        t0 = time.perf_counter()
        for _ in range(3):
            users.verify(user, "wrong")
        return time.perf_counter() - t0

    known, unknown = cost("alice"), cost("nobody")
    assert unknown > known * 0.5  # an unknown user also runs scrypt


@pytest.mark.parametrize(
    "line",
    ["alice", "alice:plain", "alice:scrypt$16384$8$1$AAAA", "alice:scrypt$1000$8$1$AAAA$AAAA",
     "alice:scrypt$16384$8$1$!!$AAAA", "a b:scrypt$16384$8$1$AAAA$AAAA"],
)  # fmt: skip
def test_bad_users_file_names_the_line_and_keeps_old_table(tmp_path, line):
    path = tmp_path / "users"
    path.write_text(f"bob:{hash_password('pw')}\n")
    users = Users(str(path))
    path.write_text(f"# c\nbob:{hash_password('new')}\n{line}\n")
    with pytest.raises(UsersFileError, match=r"users:3: "):
        users.load()
    assert users.verify("bob", "pw")  # old table still in use


def test_reload_if_changed(tmp_path):
    path = tmp_path / "users"
    set_password(path, "alice", "one")
    users = Users(path)
    assert not users.reload_if_changed()
    set_password(path, "alice", "two")
    assert users.reload_if_changed()
    assert users.verify("alice", "two") and not users.verify("alice", "one")


def test_set_password_adds_replaces_and_keeps_other_lines(tmp_path):
    path = tmp_path / "users"
    path.write_text("# header comment\nzed:" + hash_password("z") + "\n")
    os.chmod(path, 0o644)
    set_password(path, "alice", "a1")
    set_password(path, "alice", "a2")
    text = path.read_text()
    assert text.startswith("# header comment\nzed:")
    assert text.count("alice:") == 1
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    users = Users(path)
    assert users.verify("alice", "a2") and users.verify("zed", "z")
    assert [p.name for p in tmp_path.iterdir()] == ["users"]  # no temp file left behind
    with pytest.raises(ValueError):
        set_password(path, "bad:name", "x")
    with pytest.raises(ValueError):
        set_password(path, "carol", "")


def test_failure_delay_grows_and_caps():
    assert failure_delay(1.0, 0) == 0
    assert [failure_delay(1.0, n) for n in (1, 2, 3, 4)] == [1, 2, 4, 8]
    assert failure_delay(1.0, 50) == 30
    assert failure_delay(0, 5) == 0


# --------------------------------------------------------------------------- SASL PLAIN


def test_plain_with_initial_response():
    s = start("PLAIN", b64(b"\0alice\0secret"))
    assert s.initial == SaslDone("alice", "secret") and s.done


def test_plain_authzid_equal_to_authcid_is_accepted():
    assert start("plain", b64(b"alice\0alice\0pw")).initial == SaslDone("alice", "pw")


def test_plain_without_initial_response():
    s = start("PLAIN", None)
    assert s.initial == SaslChallenge(b"") and not s.done
    assert s.step(b64("\0bob\0pässwörd".encode()) + b"\r\n") == SaslDone("bob", "pässwörd")
    assert s.done
    with pytest.raises(RuntimeError):
        s.step(b"")


@pytest.mark.parametrize(
    "response, error",
    [
        (b"not base64!", (501, "5.5.2")),
        (b"*", (501, "5.7.0")),
        (b64(b"alice\0secret"), (501, "5.5.2")),  # two parts
        (b64(b"\0\0secret"), (501, "5.5.2")),  # empty authcid
        (b64(b"\0alice\0"), (501, "5.5.2")),  # empty password
        (b64(b"\0al\xffice\0pw"), (501, "5.5.2")),  # not UTF-8
        (b64(b"mallory\0alice\0pw"), (535, "5.7.8")),  # authzid must be empty or equal
        (b"=", (501, "5.5.2")),  # empty response
    ],
)
def test_plain_errors(response, error):
    as_initial = start("PLAIN", response)
    as_step = start("PLAIN", None)
    for s, result in ((as_initial, as_initial.initial), (as_step, as_step.step(response))):
        assert isinstance(result, SaslError)
        assert (result.code, result.enhanced) == error
        assert s.done


def test_cancel_text():
    s = start("PLAIN", None)
    assert s.step(b"*\r\n") == SaslError(501, "5.7.0", "Authentication aborted")


def test_unsupported_mechanism():
    s = start("CRAM-MD5", None)
    assert s.initial == SaslError(504, "5.5.4", "Unrecognized authentication type")
    assert s.done


# --------------------------------------------------------------------------- SASL LOGIN


def test_login_happy_path():
    s = start("LOGIN", None)
    assert s.initial == SaslChallenge(b"Username:")
    assert base64.b64encode(s.initial.data) == b"VXNlcm5hbWU6"
    assert s.step(b64(b"alice")) == SaslChallenge(b"Password:")
    assert s.step(b64(b"secret") + b"\r\n") == SaslDone("alice", "secret")
    assert s.done


def test_login_with_initial_username():
    s = start("login", b64(b"alice"))
    assert s.initial == SaslChallenge(b"Password:")
    assert s.step(b64(b"pw")) == SaslDone("alice", "pw")


@pytest.mark.parametrize(
    "lines, error",
    [([b"*"], (501, "5.7.0")), ([b64(b"alice"), b"*"], (501, "5.7.0")),
     ([b"%%%"], (501, "5.5.2")), ([b64(b"alice"), b"%%%"], (501, "5.5.2")),
     ([b""], (501, "5.5.2")), ([b64(b"alice"), b64(b"\xff\xfe")], (501, "5.5.2"))],
)  # fmt: skip
def test_login_errors(lines, error):
    s = start("LOGIN", None)
    for line in lines:
        result = s.step(line)
    assert isinstance(result, SaslError) and (result.code, result.enhanced) == error
    assert s.done


def test_end_to_end_with_users(tmp_path):
    set_password(tmp_path / "users", "alice", "secret")
    users = Users(tmp_path / "users")
    done = start("PLAIN", b64(b"\0alice\0secret")).initial
    assert isinstance(done, SaslDone) and users.verify(done.username, done.password)
    bad = start("PLAIN", b64(b"\0alice\0guess")).initial
    assert isinstance(bad, SaslDone) and not users.verify(bad.username, bad.password)
    assert (AUTH_FAILED.code, AUTH_FAILED.enhanced) == (535, "5.7.8")
    assert auth.AUTH_OK == (235, "2.7.0", "Authentication successful")
    assert auth.MECHANISMS == ("SCRAM-SHA-256", "PLAIN", "LOGIN")


# --------------------------------------------------------------------------- SCRAM-SHA-256

# RFC 7677 3: user "user", password "pencil"
RFC_SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
RFC_SERVER_NONCE = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
RFC_NONCE = "rOprNGfwEbeRWgbNEkqO" + RFC_SERVER_NONCE


def scram_users(tmp_path, *lines: str) -> Users:
    path = tmp_path / "users"
    path.write_text("".join(line + "\n" for line in lines))
    return Users(path)


def test_scram_rfc7677_example(tmp_path):
    users = scram_users(
        tmp_path, f"user:{hash_password('pencil')}:{scram_keys('pencil', RFC_SALT, 4096)}"
    )
    s = start("SCRAM-SHA-256", b64(b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"), users, RFC_SERVER_NONCE)
    assert s.initial == SaslChallenge(f"r={RFC_NONCE},s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096".encode())
    final = f"c=biws,r={RFC_NONCE},p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
    assert s.step(b64(final.encode())) == SaslChallenge(
        b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
    )
    assert s.step(b"") == SaslVerified("user", True) and s.done


def scram_exchange(users: Users, user: str, password: str, mech: str = "scram-sha-256"):
    """Run a whole exchange with the independent test client; returns the last result."""
    c = ScramClient(user, password)
    s = start(mech, None, users)
    assert s.initial == SaslChallenge(b"")  # no initial response: the client goes first
    first = s.step(b64(c.first()))
    assert isinstance(first, SaslChallenge)
    final = s.step(b64(c.final(first.data)))
    if not isinstance(final, SaslChallenge):
        return final
    assert c.check(final.data)  # the server proved it holds the keys
    return s.step(b"")


def test_scram_with_set_password_and_failures(tmp_path):
    set_password(tmp_path / "users", "alice", "s3cret")
    (tmp_path / "users").write_text(
        (tmp_path / "users").read_text() + f"old:{hash_password('s3cret')}\n"  # no SCRAM keys
    )
    users = Users(tmp_path / "users")
    assert users.verify("alice", "s3cret")  # PLAIN/LOGIN still check the scrypt hash
    assert scram_exchange(users, "alice", "s3cret") == SaslVerified("alice", True)
    assert scram_exchange(users, "alice", "guess") == SaslVerified("alice", False)
    assert scram_exchange(users, "nobody", "s3cret") == SaslVerified("nobody", False)
    old = scram_exchange(users, "old", "s3cret")  # the server's log says what to do
    assert old == SaslVerified("old", False, old.reason) and "no SCRAM keys" in old.reason


def test_scram_salt_does_not_tell_whether_a_user_exists(tmp_path):
    users = scram_users(tmp_path, f"alice:{hash_password('x')}:{scram_keys('x')}")

    def salt_of(user: str) -> bytes:
        first = start("SCRAM-SHA-256", b64(f"n,,n={user},r=abc".encode()), users).initial
        assert isinstance(first, SaslChallenge)
        return first.data.split(b",s=")[1]

    assert salt_of("mallory") == salt_of("mallory") != salt_of("trudy")
    assert salt_of("alice") == salt_of("alice")


@pytest.mark.parametrize(
    "first, error",
    [
        (b"p=tls-unique,,n=user,r=abc", (504, "5.5.4")),  # channel binding: no -PLUS offered
        (b"n,,m=ext,n=user,r=abc", (504, "5.5.4")),  # unknown mandatory extension
        (b"n,a=admin,n=user,r=abc", (535, "5.7.8")),  # authorization identity of another user
        (b"n,,n=user", (501, "5.5.2")),  # no nonce
        (b"n,,n=us=3Xer,r=abc", (501, "5.5.2")),  # "=" not followed by 2C or 3D
        (b"x,,n=user,r=abc", (501, "5.5.2")),
        (b"n,,r=abc,n=user", (501, "5.5.2")),
        (b"n,,n=user,r=a\x01c", (501, "5.5.2")),  # nonce not printable
        (b"\xff,,", (501, "5.5.2")),  # not UTF-8
    ],
)
def test_scram_client_first_errors(tmp_path, first, error):
    users = scram_users(tmp_path, f"user:{hash_password('x')}:{scram_keys('x')}")
    r = start("SCRAM-SHA-256", b64(first), users).initial
    assert isinstance(r, SaslError) and (r.code, r.enhanced) == error


def test_scram_client_final_must_match_the_exchange(tmp_path):
    users = scram_users(tmp_path, f"u=,x:{hash_password('pw')}:{scram_keys('pw')}")
    c = ScramClient("u=,x", "pw")
    assert c.bare.startswith("n=u=3D=2Cx,")  # saslname escapes
    good = None
    for tamper in ("nonce", "binding", "malformed", None):
        s = start("SCRAM-SHA-256", b64(c.first()), users)
        assert isinstance(s.initial, SaslChallenge)
        final = c.final(s.initial.data)
        if tamper == "nonce":
            final = final.replace(b"r=", b"r=x", 1)
        elif tamper == "binding":
            final = final.replace(b"c=biws", b"c=eSws")  # "y,,"
        elif tamper == "malformed":
            final = final.replace(b",p=", b",q=")
        r = s.step(b64(final))
        if tamper == "malformed":
            assert isinstance(r, SaslError) and r.code == 501
        elif tamper:
            assert r == SaslVerified("u=,x", False)
        else:
            good = s
            assert isinstance(r, SaslChallenge) and c.check(r.data)
    assert good is not None
    r = good.step(b64(b"unexpected"))  # the answer to the server signature must be empty
    assert isinstance(r, SaslError) and r.code == 501


def test_scram_needs_users_and_aborts_on_star(tmp_path):
    assert start("SCRAM-SHA-256", None).initial.code == 504  # type: ignore[union-attr]
    users = scram_users(tmp_path, f"user:{hash_password('x')}:{scram_keys('x')}")
    s = start("SCRAM-SHA-256", None, users)
    r = s.step(b"*")
    assert isinstance(r, SaslError) and r.code == 501 and s.done


@pytest.mark.parametrize(
    "field",
    [
        "scram-sha-1$4096$c2FsdA==$AAAA$AAAA",
        "scram-sha-256$0$c2FsdA==$" + "A" * 44 + "$" + "A" * 44,
        "scram-sha-256$4096$c2FsdA==$AAAA$AAAA",  # keys not 32 bytes
        "scram-sha-256$4096$c2FsdA==",
    ],
)
def test_bad_scram_field_names_the_line(tmp_path, field):
    path = tmp_path / "users"
    path.write_text(f"# c\nalice:{hash_password('x')}:{field}\n")
    with pytest.raises(UsersFileError, match=r"users:2: "):
        Users(path)


@pytest.mark.parametrize(
    "text, prepared",
    [
        ("I\u00adX", "IX"),  # RFC 4013 3: soft hyphen mapped to nothing
        ("user", "user"),
        ("USER", "USER"),  # case preserved
        ("\u00aa", "a"),  # NFKC
        ("\u2168", "IX"),  # NFKC
        ("a\u00a0b", "a b"),  # non-ASCII space mapped to space
    ],
)
def test_saslprep_rfc4013_examples(text, prepared):
    assert auth.saslprep(text) == prepared


@pytest.mark.parametrize("text", ["\u0007", "\u0627\u0031"])  # control; RTL not last
def test_saslprep_refuses(text):
    with pytest.raises(ValueError):
        auth.saslprep(text)


def test_scram_keys_use_the_prepared_password():
    """A client sends SASLprep(password) through SCRAM: the keys are made from the same."""
    assert scram_keys("I\u00adX", RFC_SALT) == scram_keys("IX", RFC_SALT)
    assert scram_keys("\u2168", RFC_SALT) == scram_keys("IX", RFC_SALT)
    assert scram_keys("a\u0007", RFC_SALT) != scram_keys("a", RFC_SALT)  # refused: used as is
