"""SMTP AUTH: the users file, password hashing, and SASL PLAIN / LOGIN / SCRAM-SHA-256.

Users file: one ``user:scrypt$<n>$<r>$<p>$<salt b64>$<hash b64>[:<scram>]`` per line, where
``<scram>`` is ``scram-sha-256$<iterations>$<salt b64>$<StoredKey b64>$<ServerKey b64>`` (RFC
5802 3: what a server keeps instead of the password); ``#`` starts a comment; blank lines are
ignored. ``fastmta passwd`` writes both (``set_password``). PLAIN and LOGIN check the scrypt
hash; SCRAM-SHA-256 (RFC 7677) the SCRAM keys, so a line without them cannot use SCRAM.

SASL (RFC 4954) is sans-IO: ``start(mechanism, initial)`` returns a Sasl whose ``initial``
attribute says what to answer to the AUTH command; each further client line goes to ``step``.
Results: ``SaslChallenge`` (send "334 " + base64(data)), ``SaslDone`` (check the credentials with
``Users.verify``, then 235 2.7.0 or AUTH_FAILED), ``SaslVerified`` (the mechanism checked the
client's proof itself: 235 2.7.0 or AUTH_FAILED), ``SaslError`` (send code, enhanced code, text).
SCRAM's server signature (its "additional data with success") goes out as one more 334, which
the client answers with an empty line before the 235 (RFC 4954 4).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import secrets
import stringprep
import unicodedata

import msgspec

from .atomic import replace_file

__all__ = [
    "AUTH_FAILED",
    "AUTH_OK",
    "MECHANISMS",
    "Sasl",
    "SaslChallenge",
    "SaslDone",
    "SaslError",
    "SaslVerified",
    "ScramKeys",
    "Users",
    "UsersFileError",
    "failure_delay",
    "hash_password",
    "saslprep",
    "scram_keys",
    "set_password",
    "start",
]

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
_SALT_BYTES, _HASH_BYTES = 16, 32
_MAX_N = 2**20  # refuse absurd cost parameters from a damaged file (memory = 128 * n * r bytes)
SCRAM_ITERATIONS = 4096  # RFC 7677 4: at least 4096; every login costs the client this many
_MAX_SCRAM_ITERATIONS = 10_000_000


class UsersFileError(ValueError):
    """A malformed users file; the message names the file and line."""


def _scrypt(password: bytes, salt: bytes, n: int, r: int, p: int, dklen: int) -> bytes:
    return hashlib.scrypt(
        password, salt=salt, n=n, r=r, p=p, dklen=dklen, maxmem=128 * r * (n + p + 2) + (1 << 20)
    )


def hash_password(pw: str) -> str:
    """``scrypt$16384$8$1$<salt b64>$<hash b64>`` for ``pw`` (UTF-8), with a random 16-byte salt."""
    salt = secrets.token_bytes(_SALT_BYTES)
    digest = _scrypt(pw.encode(), salt, SCRYPT_N, SCRYPT_R, SCRYPT_P, _HASH_BYTES)
    b64 = base64.b64encode
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def _parse_hash(text: str) -> tuple[int, int, int, bytes, bytes]:
    parts = text.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        raise ValueError("expected scrypt$<n>$<r>$<p>$<salt>$<hash>")
    n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
    if not (1 < n <= _MAX_N and n & (n - 1) == 0 and 1 <= r <= 64 and 1 <= p <= 16):
        raise ValueError(f"scrypt parameters out of range: n={n} r={r} p={p}")
    salt = base64.b64decode(parts[4], validate=True)
    digest = base64.b64decode(parts[5], validate=True)
    if not digest:
        raise ValueError("empty hash")
    return n, r, p, salt, digest


class ScramKeys(msgspec.Struct, frozen=True):
    """RFC 5802 3: what the server stores for SCRAM (never the password)."""

    iterations: int
    salt: bytes
    stored_key: bytes
    server_key: bytes


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.digest(key, msg, "sha256")


_PROHIBITED = (
    stringprep.in_table_c12,  # non-ASCII space (mapped to " " first; none may remain)
    stringprep.in_table_c21_c22,  # control characters
    stringprep.in_table_c3,  # private use
    stringprep.in_table_c4,  # non-character code points
    stringprep.in_table_c5,  # surrogates
    stringprep.in_table_c6,  # inappropriate for plain text
    stringprep.in_table_c7,  # inappropriate for canonical representation
    stringprep.in_table_c8,  # change display properties, deprecated
    stringprep.in_table_c9,  # tagging characters
    stringprep.in_table_a1,  # unassigned (stored strings)
)


def saslprep(text: str) -> str:
    """RFC 4013 SASLprep for stored strings; ValueError for a string it prohibits."""
    mapped = "".join(
        " " if stringprep.in_table_c12(c) else c for c in text if not stringprep.in_table_b1(c)
    )
    s = unicodedata.normalize("NFKC", mapped)
    for c in s:
        if any(table(c) for table in _PROHIBITED):
            raise ValueError(f"character U+{ord(c):04X} is prohibited by SASLprep")
    if any(stringprep.in_table_d1(c) for c in s) and (  # RFC 3454 6: bidirectional text
        any(stringprep.in_table_d2(c) for c in s)
        or not (stringprep.in_table_d1(s[0]) and stringprep.in_table_d1(s[-1]))
    ):
        raise ValueError("mixed or badly delimited right-to-left text")
    return s


def scram_keys(pw: str, salt: bytes | None = None, iterations: int = SCRAM_ITERATIONS) -> str:
    """``scram-sha-256$<i>$<salt>$<StoredKey>$<ServerKey>`` for ``pw`` (random 16-byte salt).
    The password goes through SASLprep first, as SCRAM clients do (RFC 5802 2.2 Normalize);
    one SASLprep refuses is used as it is (as PostgreSQL does)."""
    salt = secrets.token_bytes(_SALT_BYTES) if salt is None else salt
    try:
        pw = saslprep(pw)
    except ValueError:
        pass
    salted = hashlib.pbkdf2_hmac("sha256", pw.encode(), salt, iterations)  # Hi()
    stored = hashlib.sha256(_hmac(salted, b"Client Key")).digest()
    server = _hmac(salted, b"Server Key")
    b64 = base64.b64encode
    return (
        f"scram-sha-256${iterations}${b64(salt).decode()}${b64(stored).decode()}"
        f"${b64(server).decode()}"
    )


def _parse_scram(text: str) -> ScramKeys:
    parts = text.split("$")
    if len(parts) != 5 or parts[0] != "scram-sha-256":
        raise ValueError("expected scram-sha-256$<iterations>$<salt>$<StoredKey>$<ServerKey>")
    iterations = int(parts[1])
    if not 1 <= iterations <= _MAX_SCRAM_ITERATIONS:
        raise ValueError(f"SCRAM iterations out of range: {iterations}")
    salt, stored, server = (base64.b64decode(x, validate=True) for x in parts[2:])
    if not salt or len(stored) != 32 or len(server) != 32:
        raise ValueError("SCRAM salt empty or keys not 32 bytes")
    return ScramKeys(iterations, salt, stored, server)


def _check_user(user: str) -> None:
    if not user or ":" in user or any(c.isspace() for c in user) or user.startswith("#"):
        raise ValueError(
            f"invalid user name {user!r}: must be non-empty, without ':', '#' or spaces"
        )


class Users:
    """The users file, loaded into memory; ``verify`` checks a password, ``scram`` gives a
    user's SCRAM keys.

    ``Users(path)`` loads at once (``Users()`` is empty). ``load(path)`` reloads: the file is parsed
    completely before it replaces the current table, so a broken file raises UsersFileError and
    leaves the old table in use. ``reload_if_changed()`` reloads when the file's mtime/size changed.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path: str | None = None
        self._table: dict[str, tuple[tuple[int, int, int, bytes, bytes], ScramKeys | None]] = {}
        self._stamp: tuple[int, int] | None = None
        # Unknown users are checked against this, so they cost one scrypt like known ones.
        self._dummy = _parse_hash(hash_password(secrets.token_hex(8)))
        self._secret = secrets.token_bytes(32)  # makes SCRAM salts up for users without keys
        if path is not None:
            self.load(path)

    def load(self, path: str | os.PathLike[str] | None = None) -> None:
        """(Re)load the users file. Raises OSError or UsersFileError (naming path:line)."""
        path = os.fspath(path) if path is not None else self.path
        if path is None:
            raise ValueError("no users file path")
        table: dict[str, tuple[tuple[int, int, int, bytes, bytes], ScramKeys | None]] = {}
        with open(path, encoding="utf-8") as f:
            st = os.fstat(f.fileno())
            for lineno, raw in enumerate(f, 1):
                line = raw.strip()
                if not line or line.startswith("#"):
                    continue
                user, sep, rest = line.partition(":")
                hashed, _, scram = rest.partition(":")
                try:
                    if not sep:
                        raise ValueError("expected user:scrypt$...")
                    _check_user(user)
                    table[user] = (_parse_hash(hashed), _parse_scram(scram) if scram else None)
                except (ValueError, binascii.Error) as e:
                    raise UsersFileError(f"{path}:{lineno}: {e}") from None
        self.path, self._table, self._stamp = path, table, (st.st_mtime_ns, st.st_size)

    def reload_if_changed(self) -> bool:
        """Reload if the file changed since the last load; True if it did. Errors propagate."""
        if self.path is None:
            return False
        st = os.stat(self.path)
        if (st.st_mtime_ns, st.st_size) == self._stamp:
            return False
        self.load(self.path)
        return True

    def __contains__(self, user: object) -> bool:
        return user in self._table

    def __len__(self) -> int:
        return len(self._table)

    def verify(self, user: str, password: str) -> bool:
        """True if ``password`` is ``user``'s. Constant-time compare; an unknown user costs the
        same scrypt run. CPU-bound (~tens of ms): call it in a thread executor from the loop."""
        entry = self._table.get(user)
        n, r, p, salt, digest = entry[0] if entry is not None else self._dummy
        try:
            computed = _scrypt(
                password.encode("utf-8", "surrogateescape"), salt, n, r, p, len(digest)
            )
        except (ValueError, MemoryError):
            return False
        return hmac.compare_digest(computed, digest) and entry is not None

    def scram(self, user: str) -> tuple[ScramKeys, bool]:
        """``user``'s SCRAM keys and True; for a user without them (unknown, or a line written
        before SCRAM), made-up keys no proof matches and False. The made-up salt is the same at
        every attempt, so a client cannot tell which users exist (RFC 5802 9)."""
        entry = self._table.get(user)
        if entry is not None and entry[1] is not None:
            return entry[1], True
        fake = _hmac(self._secret, user.encode("utf-8", "surrogateescape"))
        return ScramKeys(SCRAM_ITERATIONS, fake[:_SALT_BYTES], fake, fake), False


def set_password(path: str | os.PathLike[str], user: str, password: str) -> None:
    """Add or replace ``user`` in the users file with a new hash of ``password`` (and SCRAM
    keys from it).

    Other lines (comments included) are kept. Atomic: written to a temp file in the same
    directory (mode 0600), fsync'd, renamed over the original, directory fsync'd.
    Raises ValueError for an invalid user name or empty password.
    """
    _check_user(user)
    if not password:
        raise ValueError("empty password")
    path = os.fspath(path)
    entry = f"{user}:{hash_password(password)}:{scram_keys(password)}\n"
    lines: list[str] = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except FileNotFoundError:
        pass
    out, replaced = [], False
    for line in lines:
        if (
            line.strip()
            and not line.lstrip().startswith("#")
            and line.partition(":")[0].strip() == user
        ):
            if not replaced:
                out.append(entry)
                replaced = True
            continue
        out.append(line if line.endswith("\n") else line + "\n")
    if not replaced:
        out.append(entry)
    replace_file(path, "".join(out).encode("utf-8"))


def failure_delay(base: float, failures: int, cap: float = 30.0) -> float:
    """Seconds to wait before answering the ``failures``-th failed AUTH: base, 2*base, 4*base...
    capped at ``cap`` (slows password guessing; RFC 4954 14 security considerations)."""
    if failures <= 0 or base <= 0:
        return 0.0
    return min(base * 2 ** min(failures - 1, 30), cap)


# --------------------------------------------------------------------------- SASL


class SaslChallenge(msgspec.Struct, frozen=True):
    """Send ``334 <base64(data)>`` and feed the client's next line to ``step``."""

    data: bytes


class SaslDone(msgspec.Struct, frozen=True):
    """The client sent credentials; verify them (235 2.7.0 or AUTH_FAILED)."""

    username: str
    password: str


class SaslVerified(msgspec.Struct, frozen=True):
    """The mechanism checked the client's proof itself (SCRAM): 235 2.7.0 when ``ok``, else
    AUTH_FAILED, counted and slowed down like a wrong password. ``reason``: for the server's
    log only (never sent to the client)."""

    username: str
    ok: bool
    reason: str = ""


class SaslError(msgspec.Struct, frozen=True):
    """The exchange failed; send ``code enhanced text``. The session is back to no AUTH."""

    code: int
    enhanced: str
    text: str


MECHANISMS: tuple[str, ...] = ("SCRAM-SHA-256", "PLAIN", "LOGIN")
AUTH_OK: tuple[int, str, str] = (235, "2.7.0", "Authentication successful")  # RFC 4954 6
AUTH_FAILED = SaslError(535, "5.7.8", "Authentication credentials invalid")  # RFC 4954 6
_UNSUPPORTED = SaslError(504, "5.5.4", "Unrecognized authentication type")  # RFC 4954 4
_ABORTED = SaslError(501, "5.7.0", "Authentication aborted")  # RFC 4954 4 ("*" from the client)
_BAD_BASE64 = SaslError(501, "5.5.2", "Invalid base64 data")  # RFC 4954 4
_MALFORMED = SaslError(501, "5.5.2", "Malformed authentication data")
_AUTHZ = SaslError(535, "5.7.8", "Authorization identity not allowed")
_NO_CHANNEL_BINDING = SaslError(504, "5.5.4", "Channel binding is not supported")  # no -PLUS
_NO_EXTENSION = SaslError(504, "5.5.4", "Unsupported mandatory SCRAM extension")

SaslResult = SaslChallenge | SaslDone | SaslVerified | SaslError


def _decode(line: bytes) -> bytes | SaslError:
    text = line.strip(b"\r\n").strip()
    if text == b"*":
        return _ABORTED
    if text == b"=":  # RFC 4954 4: "=" is an empty initial response
        return b""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return _BAD_BASE64


class Sasl:
    """One SASL exchange. ``initial`` is the first result (the answer to the AUTH command);
    call ``step`` with each client line while the last result was a SaslChallenge. ``done``
    is True once a SaslDone or SaslError was returned. No I/O."""

    mechanism: str = ""

    def __init__(self) -> None:
        self.done = False
        self.initial: SaslResult = _UNSUPPORTED

    def _begin(self, initial: bytes | None, challenge: bytes) -> None:
        """The answer to ``AUTH <mechanism> [initial]``: ``challenge`` without an initial
        response, else the result of the initial response."""
        if initial is None:
            self.initial = SaslChallenge(challenge)
        else:
            decoded = _decode(initial)
            self.initial = self._finish(
                decoded if isinstance(decoded, SaslError) else self._on_data(decoded)
            )

    def _finish(self, result: SaslResult) -> SaslResult:
        if not isinstance(result, SaslChallenge):
            self.done = True
        return result

    def step(self, line: bytes) -> SaslResult:
        """Feed one client line (base64 text, CRLF optional); returns the next result."""
        if self.done:
            raise RuntimeError("SASL exchange already finished")
        decoded = _decode(line)
        if isinstance(decoded, SaslError):
            return self._finish(decoded)
        return self._finish(self._on_data(decoded))

    def _on_data(self, data: bytes) -> SaslResult:  # pragma: no cover - overridden
        raise NotImplementedError


def _text(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


class _Plain(Sasl):
    """RFC 4616: message = [authzid] NUL authcid NUL passwd; authzid empty or equal to authcid."""

    mechanism = "PLAIN"

    def __init__(self, initial: bytes | None) -> None:
        super().__init__()
        self._begin(initial, b"")

    def _on_data(self, data: bytes) -> SaslResult:
        parts = data.split(b"\0")
        if len(parts) != 3:
            return _MALFORMED
        authzid, authcid, passwd = (_text(p) for p in parts)
        if authzid is None or authcid is None or passwd is None or not authcid or not passwd:
            return _MALFORMED
        if authzid and authzid != authcid:
            return _AUTHZ
        return SaslDone(authcid, passwd)


class _Login(Sasl):
    """The de-facto LOGIN mechanism: "Username:" then "Password:" challenges."""

    mechanism = "LOGIN"

    def __init__(self, initial: bytes | None) -> None:
        super().__init__()
        self._user: str | None = None
        self._begin(initial, b"Username:")  # many clients send AUTH LOGIN <base64 username>

    def _on_data(self, data: bytes) -> SaslResult:
        text = _text(data)
        if text is None or not text:
            return _MALFORMED
        if self._user is None:
            self._user = text
            return SaslChallenge(b"Password:")
        return SaslDone(self._user, text)


_SASLNAME = re.compile(r"(?:[^=,]|=2C|=3D)+")
_NONCE = re.compile(r"[\x21-\x2b\x2d-\x7e]+")  # printable ASCII but ","


def _saslname(text: str) -> str | None:
    """RFC 5802 5.1 saslname: "=2C" is ",", "=3D" is "="; any other "=" is malformed."""
    if not _SASLNAME.fullmatch(text):
        return None
    return text.replace("=2C", ",").replace("=3D", "=")


class _Scram(Sasl):
    """SCRAM-SHA-256 (RFC 5802, RFC 7677), without channel binding (no -PLUS variant):
    client-first (user, client nonce) -> server-first (nonce, salt, iterations) -> client-final
    (proof) -> server-final (the server's signature, proving it knows the keys too) -> the
    client's empty line -> SaslVerified."""

    mechanism = "SCRAM-SHA-256"

    def __init__(self, initial: bytes | None, users: Users, nonce: str | None = None) -> None:
        super().__init__()
        self._users = users
        self._server_nonce = nonce  # the server's part of the nonce (tests); else random
        self._user = ""
        self._gs2 = ""  # the client's GS2 header, echoed in its final message (c=)
        self._nonce = ""
        self._keys: ScramKeys | None = None
        self._known = False
        self._messages = ""  # client-first-message-bare "," server-first-message
        self._verified = False
        self._begin(initial, b"")

    def _on_data(self, data: bytes) -> SaslResult:
        if self._verified:  # the answer to the server signature: empty (RFC 4954 4)
            return SaslVerified(self._user, True) if not data else _MALFORMED
        text = _text(data)
        if text is None:
            return _MALFORMED
        return self._client_first(text) if self._keys is None else self._client_final(text)

    def _client_first(self, text: str) -> SaslResult:
        parts = text.split(",", 2)
        if len(parts) != 3:
            return _MALFORMED
        cbind, authz, bare = parts
        if cbind.startswith("p="):
            return _NO_CHANNEL_BINDING
        if cbind not in ("n", "y") or (authz and not authz.startswith("a=")):
            return _MALFORMED
        attrs = bare.split(",")
        if attrs[0].startswith("m="):
            return _NO_EXTENSION
        if len(attrs) < 2 or not attrs[0].startswith("n=") or not attrs[1].startswith("r="):
            return _MALFORMED
        user = _saslname(attrs[0][2:])
        if user is None or not _NONCE.fullmatch(attrs[1][2:]):
            return _MALFORMED
        if authz and _saslname(authz[2:]) != user:
            return _AUTHZ
        self._user = user
        self._gs2 = f"{cbind},{authz},"
        self._nonce = attrs[1][2:] + (self._server_nonce or secrets.token_urlsafe(18))
        keys, self._known = self._users.scram(user)
        self._keys = keys
        first = f"r={self._nonce},s={base64.b64encode(keys.salt).decode()},i={keys.iterations}"
        self._messages = f"{bare},{first}"
        return SaslChallenge(first.encode())

    def _client_final(self, text: str) -> SaslResult:
        without_proof, sep, proof_b64 = text.rpartition(",p=")
        attrs = without_proof.split(",")
        if not sep or len(attrs) < 2 or attrs[0][:2] != "c=" or attrs[1][:2] != "r=":
            return _MALFORMED
        try:
            binding = base64.b64decode(attrs[0][2:], validate=True)
            proof = base64.b64decode(proof_b64, validate=True)
        except (binascii.Error, ValueError):
            return _MALFORMED
        keys = self._keys
        assert keys is not None
        auth_message = f"{self._messages},{without_proof}".encode()
        signature = _hmac(keys.stored_key, auth_message)
        client_key = bytes(a ^ b for a, b in zip(proof, signature, strict=False))
        ok = (
            self._known
            and binding == self._gs2.encode()
            and attrs[1][2:] == self._nonce
            and len(proof) == len(signature)
            and hmac.compare_digest(hashlib.sha256(client_key).digest(), keys.stored_key)
        )
        if not ok:
            why = ""
            if not self._known and self._user in self._users:
                why = "no SCRAM keys for it in the users file: run fastmta passwd for it again"
            return SaslVerified(self._user, False, why)
        self._verified = True
        return SaslChallenge(b"v=" + base64.b64encode(_hmac(keys.server_key, auth_message)))


class _Unsupported(Sasl):
    def __init__(self) -> None:
        super().__init__()
        self.initial = self._finish(_UNSUPPORTED)


def start(
    mechanism: str, initial: bytes | None, users: Users | None = None, nonce: str | None = None
) -> Sasl:
    """Begin ``AUTH <mechanism> [initial]``. ``initial`` is the initial response exactly as on
    the command line (base64 text, or b"=" for empty), None if absent. Mechanism names are
    case-insensitive. Read the first result from ``.initial``; unknown mechanisms give
    SaslError 504 5.5.4 there. SCRAM-SHA-256 needs ``users`` (it reads the user's keys
    during the exchange); ``nonce`` fixes the server's part of its nonce (tests only)."""
    mech = mechanism.upper()
    if mech == "PLAIN":
        return _Plain(initial)
    if mech == "LOGIN":
        return _Login(initial)
    if mech == "SCRAM-SHA-256" and users is not None:
        return _Scram(initial, users, nonce)
    return _Unsupported()
