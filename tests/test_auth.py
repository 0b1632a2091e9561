"""fastmta.auth: scrypt users file, verification, set_password, SASL PLAIN and LOGIN."""

from __future__ import annotations

import base64
import os
import stat
import time

import pytest

from fastmta import auth
from fastmta.auth import (
    AUTH_FAILED,
    SaslChallenge,
    SaslDone,
    SaslError,
    Users,
    UsersFileError,
    failure_delay,
    hash_password,
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
    assert auth.MECHANISMS == ("PLAIN", "LOGIN")
