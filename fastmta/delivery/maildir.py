"""Local delivery into Maildir mailboxes.

Layout: ``<root>/<domain>/<user>/{tmp,new,cur}``. A message is written with the Maildir
protocol (https://cr.yp.to/proto/maildir.html): create a uniquely named file in ``tmp/``,
write it, fsync it, rename it into ``new/``, fsync ``new/``. A crash at any instant leaves either
nothing in ``new/`` or the complete message; a stale file in ``tmp/`` is harmless.

Everything here is synchronous and blocking; the caller runs :meth:`MaildirDelivery.deliver`
in a thread executor. It is thread-safe: names are unique per (time, pid, counter, host).
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastmta.config import LocalConfig

__all__ = ["MaildirDelivery", "UnknownRecipient", "unstuff_to_lf"]

# RFC 5321 section 4.2.2 / RFC 3463 section 3.2: unknown mailbox, bad mailbox syntax.
_UNKNOWN = (550, "5.1.1", "Recipient address rejected: User unknown")
_BAD_NAME = (553, "5.1.3", "Recipient address rejected: mailbox name not allowed")

# Process-wide counter for the "Q" part of unique names; itertools.count is atomic under the GIL.
_counter = itertools.count(1)


class UnknownRecipient(ValueError):
    """Raised by :meth:`MaildirDelivery.deliver` for an address :meth:`check` would refuse.

    ``reply`` holds the (code, enhanced status, text) tuple; the failure is permanent.
    """

    def __init__(self, reply: tuple[int, str, str]) -> None:
        super().__init__(f"{reply[0]} {reply[1]} {reply[2]}")
        self.reply = reply


def unstuff_to_lf(wire: bytes) -> bytes:
    """Turn a message in wire form (CRLF, dot-stuffed, no final ".\\r\\n") into LF form.

    Removes the dot added to every line that starts with "." (RFC 5321 section 4.5.2) and
    turns CRLF into LF. The result ends with a newline. Whole-message bytes operations: no
    per-line Python loop.
    """
    if wire.startswith(b".."):
        wire = wire[1:]
    out = wire.replace(b"\r\n..", b"\n.").replace(b"\r\n", b"\n")
    if out and not out.endswith(b"\n"):
        out += b"\n"
    return out


def _safe_component(name: str) -> bool:
    """True when ``name`` can be used as one path component without escaping the root."""
    if name in ("", ".", "..") or "/" in name or "\\" in name:
        return False
    return all(ord(c) >= 0x20 and c != "\x7f" for c in name)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class MaildirDelivery:
    """Delivers messages to ``<root>/<domain>/<user>/`` Maildirs.

    ``users`` maps a domain to its set of known users (local parts). A domain listed there
    only accepts those users (case-insensitive, with any ``+detail`` removed); a domain not
    listed, or ``users=None``, accepts every user. ``catch_all`` receives mail for unknown
    users of a listed domain: either a local part (same domain) or a full ``user@domain``.
    ``postmaster`` of a listed domain is always accepted (RFC 5321 4.5.1): without a catch-all
    it goes to the domain's ``postmaster`` Maildir.
    ``recipient_delimiter`` separates user and detail ("" disables detail stripping).
    ``fsync=False`` skips every fsync (tests and benchmarks only: not crash-safe).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        users: dict[str, set[str]] | None = None,
        catch_all: str | None = None,
        fsync: bool = True,
        recipient_delimiter: str = "+",
        hostname: str | None = None,
    ) -> None:
        self.root = os.fspath(root)
        self.users = (
            None
            if users is None
            else {d.lower(): {u.lower() for u in us} for d, us in users.items()}
        )
        self.catch_all = catch_all.lower() if catch_all else None
        self.fsync = fsync
        self.recipient_delimiter = recipient_delimiter
        host = hostname or socket.gethostname() or "localhost"
        # Maildir spec: "/" and ":" in the host part are written as octal escapes; "," too,
        # because ",S=" starts the size field.
        self._host = host.replace("/", r"\057").replace(":", r"\072").replace(",", r"\054")
        self._ready: set[str] = set()  # Maildirs known to exist with tmp/new/cur

    @classmethod
    def from_config(cls, local: LocalConfig, *, hostname: str | None = None) -> MaildirDelivery:
        """The Maildirs of the ``[local]`` section (root, users, catch-all, delimiter)."""
        return cls(
            local.maildir_root or "maildir",
            users=local.users_by_domain() or None,
            catch_all=local.catch_all or None,
            recipient_delimiter=local.recipient_delimiter,
            hostname=hostname,
        )

    # -- addressing ---------------------------------------------------------------------------

    def _split(self, address: str) -> tuple[str, str]:
        addr = address.strip()
        if addr.startswith("<") and addr.endswith(">"):
            addr = addr[1:-1]
        local, at, domain = addr.rpartition("@")
        if not at:
            raise ValueError(f"not an address with a domain: {address!r}")
        local = local.lower()
        if self.recipient_delimiter:
            local = local.split(self.recipient_delimiter, 1)[0]
        return local, domain.lower()

    def _resolve(self, address: str) -> tuple[str, str]:
        """Return (domain, user) of the mailbox for ``address``; raise UnknownRecipient."""
        try:
            user, domain = self._split(address)
        except ValueError:
            raise UnknownRecipient(_reply(_BAD_NAME, address)) from None
        if (
            self.users is not None
            and domain in self.users
            and user not in self.users[domain]
            and (user != "postmaster" or self.catch_all is not None)
        ):
            # RFC 5321 4.5.1: postmaster of every domain we take mail for must be accepted;
            # unlisted, it gets that domain's "postmaster" Maildir (or the catch-all: someone
            # reads that one)
            if self.catch_all is None:
                raise UnknownRecipient(_reply(_UNKNOWN, address))
            if "@" in self.catch_all:
                user, domain = self.catch_all.rsplit("@", 1)
            else:
                user = self.catch_all
        if not (_safe_component(user) and _safe_component(domain)):
            raise UnknownRecipient(_reply(_BAD_NAME, address))
        return domain, user

    def check(self, address: str) -> None | tuple[int, str, str]:
        """RCPT-time check: None when ``address`` is deliverable, else (code, status, text).

        Unknown user of a domain with a user list and no catch-all:
        ``(550, "5.1.1", "<addr>: Recipient address rejected: User unknown")``.
        A name that cannot be a mailbox directory (no domain, empty, "..", "/", control
        characters): ``(553, "5.1.3", ...)`` (RFC 5321 section 4.2.2: mailbox name not allowed).
        """
        try:
            self._resolve(address)
        except UnknownRecipient as e:
            return e.reply
        return None

    def maildir_path(self, address: str) -> str:
        """Path of the Maildir that receives ``address``; raises :class:`UnknownRecipient`."""
        domain, user = self._resolve(address)
        return os.path.join(self.root, domain, user)

    # -- delivery -----------------------------------------------------------------------------

    def _ensure(self, maildir: str) -> None:
        """Create ``maildir`` with tmp/new/cur; fsync the parent of every directory created."""
        if maildir in self._ready:
            return
        created_in: set[str] = set()
        domain_dir = os.path.dirname(maildir)
        for path in (self.root, domain_dir, maildir):
            try:
                os.mkdir(path, 0o700)
                created_in.add(os.path.dirname(path) or ".")
            except FileExistsError:
                pass
        for sub in ("tmp", "new", "cur"):
            try:
                os.mkdir(os.path.join(maildir, sub), 0o700)
                created_in.add(maildir)
            except FileExistsError:
                pass
        if self.fsync:
            for parent in created_in:
                _fsync_dir(parent)
        self._ready.add(maildir)

    def deliver(
        self, address: str, wire: bytes, *, return_path: str, delivered_to: bool = True
    ) -> str:
        """Deliver one message to ``address``'s Maildir; return the path of the file in new/.

        ``wire`` is the message in wire form (CRLF, dot-stuffed, without the final ".\\r\\n").
        The stored file starts with ``Return-Path: <return_path>`` (``<>`` for the null
        sender) and, unless ``delivered_to`` is False, ``Delivered-To: <address>``; the
        message follows un-dot-stuffed and with LF line endings, the Maildir convention (mail
        readers expect local files in the Unix newline form).

        Blocking. Returns only after the file and the new/ directory entry are fsync'd.
        Raises :class:`UnknownRecipient` for an address :meth:`check` refuses (permanent),
        and OSError on any file system failure (the caller defers: 451 4.3.0); in that case
        the tmp/ file is removed when possible.
        """
        maildir = self.maildir_path(address)
        rp = return_path.strip()
        if rp.startswith("<") and rp.endswith(">"):
            rp = rp[1:-1]
        if any(c in rp or c in address for c in "\r\n\0"):
            raise ValueError("line break or NUL in an envelope address")
        head = f"Return-Path: <{rp}>\n"
        if delivered_to:
            head += f"Delivered-To: {address.strip().strip('<>')}\n"
        data = head.encode("utf-8") + unstuff_to_lf(wire)

        tmp_dir = os.path.join(maildir, "tmp")
        for attempt in range(3):
            self._ensure(maildir)
            now = time.time()
            sec = int(now)
            usec = int((now - sec) * 1_000_000)
            name = f"{sec}.M{usec}P{os.getpid()}Q{next(_counter)}.{self._host},S={len(data)}"
            tmp_path = os.path.join(tmp_dir, name)
            try:
                fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                break
            except FileExistsError:  # pragma: no cover - needs a clock step back and pid reuse
                continue
            except FileNotFoundError:
                # The Maildir was removed behind our back: forget it and create it again.
                self._ready.discard(maildir)
                if attempt == 2:
                    raise
        else:  # pragma: no cover
            raise FileExistsError(tmp_path)
        new_path = os.path.join(maildir, "new", name)
        try:
            try:
                view = memoryview(data)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp_path, new_path)
        except BaseException:
            try:
                os.unlink(tmp_path)
            except OSError:
                pass
            raise
        if self.fsync:
            _fsync_dir(os.path.join(maildir, "new"))
        return new_path


def _reply(template: tuple[int, str, str], address: str) -> tuple[int, str, str]:
    addr = address.strip()
    if not (addr.startswith("<") and addr.endswith(">")):
        addr = f"<{addr}>"
    return template[0], template[1], f"{addr}: {template[2]}"
