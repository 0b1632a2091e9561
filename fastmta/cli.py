"""The ``fastmta`` command: serve, send (sendmail-style injection), passwd, config, queue, bench.

Exit codes follow sysexits.h where sendmail users expect them: 64 EX_USAGE (bad address, no
recipient), 65 EX_DATAERR (message too big, or a mail loop), 69 EX_UNAVAILABLE (queue: server
not running), 75 EX_TEMPFAIL (spool write failed); configuration errors exit 2 like argparse
usage errors.
"""

from __future__ import annotations

import argparse
import email.utils
import getpass
import os
import re
import sys
import textwrap
import time
from collections.abc import Sequence
from typing import Any

from fastmta import __version__, build_kind
from fastmta.config import (
    DNS_NAME,
    Config,
    ConfigError,
    check_files,
    dump_example,
    load_config,
)

__all__ = [
    "add_missing_headers",
    "build_parser",
    "check_address",
    "fold_long_line",
    "main",
    "prepare_message",
    "split_lines",
]

VERSION = __version__
EX_USAGE, EX_DATAERR, EX_CANTCREAT, EX_TEMPFAIL = 64, 65, 73, 75
EX_CONFIG = 2

_DESCRIPTION = """\
fastmta: a high-throughput outbound mail transfer agent.

It accepts mail over SMTP (or from `fastmta send`), writes it durably to an on-disk spool, and
delivers it to each recipient domain's mail exchangers in parallel over reused connections.
Every setting has a working default; `fastmta config --example` prints them all, annotated."""

_EPILOG = """\
examples:
  fastmta serve                                  relay on 127.0.0.1:2525, spool ./fastmta-spool
  fastmta serve --config /etc/fastmta.toml
  fastmta serve --listen 0.0.0.0:25 --relay [smtp.example.net]:587
  fastmta send -t < message.eml                  queue a message (like sendmail -t)
  fastmta passwd alice --file /etc/fastmta/users add or change an SMTP AUTH user
  fastmta config --check /etc/fastmta.toml       validate a configuration file
  fastmta config --check /etc/fastmta.toml --route sales@example.com
                                                 where mail to an address would go
  fastmta queue list                             show queued messages
  fastmta dkim keygen example.com s1 --out k.pem make a DKIM key; print its DNS record

run `fastmta COMMAND --help` for each command's options."""


def _version_text() -> str:
    return f"fastmta {VERSION} ({build_kind()})"


class _VersionAction(argparse.Action):
    def __init__(self, option_strings: Sequence[str], dest: str, **kw: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print the version and parser kind")

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        print(_version_text())
        parser.exit(0)


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the ``fastmta`` command."""
    raw = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(
        prog="fastmta", description=_DESCRIPTION, epilog=_EPILOG, formatter_class=raw
    )
    p.add_argument("--version", action=_VersionAction)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    s = sub.add_parser(
        "serve",
        help="run the MTA (SMTP listeners, spool, delivery)",
        description="Run the MTA: listen for SMTP, spool accepted mail durably, deliver it. "
        "Command-line options override the configuration file.",
    )
    s.add_argument(
        "--config", metavar="FILE", help="TOML configuration file (default: built-in defaults)"
    )
    s.add_argument(
        "--listen", metavar="HOST:PORT", action="append",
        help="listen here instead of the configured listeners (role relay; repeatable; "
        "\"[::1]:2525\" for IPv6)",
    )  # fmt: skip
    s.add_argument("--spool", metavar="DIR", help="spool directory (server.spool_dir)")
    s.add_argument("--workers", metavar="N", type=int, help="worker processes, 0 = one per CPU")
    s.add_argument("--hold", action="store_true", help="accept and spool mail but deliver nothing")
    s.add_argument(
        "--relay", metavar="HOST:PORT",
        help="send all mail through this smarthost (\"[host]:port\" skips the MX lookup)",
    )  # fmt: skip

    m = sub.add_parser(
        "send",
        help="queue a message read from stdin (sendmail-compatible)",
        description="Read a message from standard input (to end of file, like sendmail -i) and "
        "write it into the spool, where a running (or the next) `fastmta serve` delivers it. "
        "Bare LF line endings become CRLF; Date, Message-ID and From are added when missing. "
        "A line longer than 998 octets (RFC 5322 2.1.1) is broken by inserting CRLF and a space, "
        "as Postfix does for SMTP (smtp_line_length_limit); a message with a NUL octet is "
        "refused (exit 65), as the SMTP listener refuses it. Prints the queue id.",
    )
    m.add_argument(
        "-f",
        dest="sender",
        metavar="SENDER",
        help='envelope sender (default: you@hostname; "<>" = null)',
    )
    m.add_argument(
        "-t",
        dest="extract",
        action="store_true",
        help="also take recipients from To:, Cc:, Bcc: (Bcc: is removed)",
    )
    m.add_argument(
        "-i",
        dest="ignore_dots",
        action="store_true",
        help="accepted for sendmail compatibility (always on)",
    )
    m.add_argument(
        "-o",
        dest="sendmail_options",
        metavar="OPT",
        action="append",
        help="sendmail -oX options, ignored",
    )
    m.add_argument(
        "-F", dest="fullname", metavar="NAME", help="full name for an added From: header"
    )
    m.add_argument(
        "--config", metavar="FILE", help="configuration file (for spool_dir, hostname, size limit)"
    )
    m.add_argument("--spool", metavar="DIR", help="spool directory (overrides the configuration)")
    m.add_argument("recipients", nargs="*", metavar="RCPT", help="recipient addresses")

    w = sub.add_parser(
        "passwd",
        help="add a user to the SMTP AUTH users file, or change a password",
        description="Set USER's password in the users file (a scrypt hash for AUTH PLAIN and "
        "LOGIN, SCRAM-SHA-256 keys for AUTH SCRAM-SHA-256; atomic rewrite, mode 0600). The password is asked for on a terminal, else read as one line from stdin. A running server uses the change at the next AUTH.",
    )
    w.add_argument("user", metavar="USER")
    w.add_argument(
        "--file", metavar="USERS_FILE", help="users file (default: policy.users_file of --config)"
    )
    w.add_argument("--config", metavar="FILE", help="configuration file naming policy.users_file")

    c = sub.add_parser(
        "config",
        help="print the annotated example configuration, or check a file",
        description="Print the example configuration (every key, its default and meaning), or "
        "validate a file: exit 0 if it is valid, else print the offending key and exit 2.",
    )
    g = c.add_mutually_exclusive_group(required=True)
    g.add_argument(
        "--example", action="store_true", help="print the annotated example configuration"
    )
    g.add_argument("--check", metavar="FILE", help="validate FILE")
    c.add_argument(
        "--route", metavar="ADDRESS", action="append",
        help="with --check: show how mail to ADDRESS would go under FILE ([aliases], then a "
        "local Maildir, a route, the relayhost or the domain's MX hosts); no DNS lookups. "
        "Repeat for more addresses. Postfix: sendmail -bv, postmap -q",
    )  # fmt: skip

    q = sub.add_parser(
        "queue",
        help="inspect and manage the spool (list, summary, show, hold, release, flush, delete, "
        "bounce, suspend, resume, stats)",
        description="Inspect and manage queued messages. With the server running, every "
        "action asks its workers. With it stopped, list and show read the spool (never "
        "changing it), and hold, release, delete, bounce and flush change it directly (like "
        "postsuper); only stats needs the server. Select messages by queue id ('-' reads ids "
        "from stdin, e.g. from `queue list | grep`), --all, --domain (a recipient still to "
        "deliver there) or --sender; every criterion given must hold. Exit status: 0 ok, 1 "
        "some queue ids not found, 2 usage or configuration error, 69 the server is not running "
        "(stats) or a shard is locked.",
    )
    q.add_argument("--config", metavar="FILE", help="configuration file")
    q.add_argument("--spool", metavar="DIR", help="spool directory")
    where = argparse.ArgumentParser(add_help=False)  # also accepted after the action
    where.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS, help="config file")
    where.add_argument("--spool", metavar="DIR", default=argparse.SUPPRESS, help="spool directory")
    filters = argparse.ArgumentParser(add_help=False)  # which messages (list and the changes)
    filters.add_argument(
        "--domain",
        action="append",
        default=[],
        metavar="DOMAIN",
        help="messages with a recipient still to deliver at DOMAIN (repeatable)",
    )
    filters.add_argument(
        "--sender",
        action="append",
        default=[],
        metavar="ADDRESS",
        help="messages from ADDRESS ('<>': bounces) (repeatable)",
    )
    which = argparse.ArgumentParser(add_help=False, parents=[filters])  # ids too
    which.add_argument(
        "ids", nargs="*", metavar="QUEUE_ID", help="queue ids ('-': read them from stdin)"
    )
    qs = q.add_subparsers(dest="queue_command", metavar="ACTION", required=True)
    ql = qs.add_parser(
        "list",
        parents=[where, filters],
        help="list queued messages (id, arrival, size, state, envelope)",
        epilog="example: fastmta queue list --domain example.com",
    )
    ql.add_argument("--json", action="store_true", help="one JSON object per message")
    qp = qs.add_parser(
        "summary",
        parents=[where, filters],
        help="recipients still to deliver per domain and age (Postfix's qshape)",
        description="Recipients still to deliver (held ones in their own column) per "
        "recipient domain, by minutes since their message arrived: each column counts those "
        "not older than its number of minutes (the first row: every domain). Like Postfix's "
        "qshape or KumoMTA's kcli queue-summary.",
    )
    qp.add_argument("--top", type=int, default=20, metavar="N",
                    help="the N domains with most recipients (default 20; 0: all)")  # fmt: skip
    qp.add_argument("--json", action="store_true", help="one JSON object per domain")
    qp = qs.add_parser("show", parents=[where], help="print a message's envelope and headers")
    qp.add_argument("ids", nargs="+", metavar="QUEUE_ID")
    for name, text in (
        ("hold", "stop delivering these messages until released (kept across restarts)"),
        ("release", "deliver held messages again, now"),
        ("delete", "remove messages from the queue without a bounce (like postsuper -d)"),
        (
            "bounce",
            "bounce the recipients still to deliver (with --domain: only those there) back to "
            "the sender with a DSN; the others stay queued",
        ),
    ):
        qp = qs.add_parser(
            name,
            parents=[where, which],
            help=text,
            description=textwrap.fill(
                text[0].upper() + text[1:] + ". Give queue ids, --all, or a filter.", 78
            ),
            epilog=f"examples:\n  fastmta queue {name} 00061b2c3d4e5f3f2a1b0001\n"
            f"  fastmta queue {name} --domain example.com\n"
            f"  fastmta queue list | grep @example.net | fastmta queue {name} -",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        qp.add_argument("--all", action="store_true", help="every queued message")
        if name == "bounce":
            qp.add_argument(
                "--reason",
                default="",
                metavar="TEXT",
                help="why, for the DSN (one line, at most 200 characters)",
            )
    qp = qs.add_parser(
        "flush",
        parents=[where, which],
        help="retry these messages now (all deferred mail if nothing is selected)",
    )
    qp = qs.add_parser(
        "suspend",
        parents=[where],
        help="stop delivering to a domain until resumed (or for a while); no domain: the list",
        description="Stop delivering to DOMAIN (like KumoMTA's kcli suspend, Postfix's "
        "defer_transports): its mail stays queued and is deferred at each attempt without a "
        "connection; its retry schedule and lifetime run on. Kept in <spool>/suspended.json "
        "across restarts. Without --domain: print the suspended domains.",
        epilog="example: fastmta queue suspend --domain example.com --for 2h --reason '421s'",
    )
    qp.add_argument("--domain", action="append", default=[], metavar="DOMAIN",
                    help="the domain (repeatable)")  # fmt: skip
    qp.add_argument("--for", dest="duration", default="", metavar="DURATION",
                    help="lift it by itself after DURATION (30m, 2h, 1d); default: never")  # fmt: skip
    qp.add_argument("--reason", default="", metavar="TEXT",
                    help="why, in the deferral reply (one line, at most 200 characters)")  # fmt: skip
    qp = qs.add_parser(
        "resume",
        parents=[where],
        help="deliver to suspended domains again (their queued mail at once)",
    )
    qp.add_argument("--domain", action="append", default=[], metavar="DOMAIN",
                    help="the domain (repeatable)")  # fmt: skip
    qp.add_argument("--all", action="store_true", help="every suspended domain")
    qp = qs.add_parser("stats", parents=[where], help="delivery counters of each worker")
    qp.add_argument("--json", action="store_true", help="one JSON object per worker")

    k = sub.add_parser(
        "dkim",
        help="make a DKIM key, or print the DNS records of the configured ones",
        description="DKIM keys for [[dkim]] signing. `fastmta dkim keygen DOMAIN SELECTOR "
        "--out FILE` writes a new private key (mode 0600) and prints the TXT record to publish "
        "and the [[dkim]] table to add; `fastmta dkim records` prints the TXT record of each "
        "configured key (what opendkim-genkey and opendkim-testkey help with for OpenDKIM).",
    )
    ks = k.add_subparsers(dest="dkim_command", metavar="ACTION", required=True)
    kg = ks.add_parser("keygen", help="write a new private key; print its TXT record")
    kg.add_argument("domain", help="the signing domain (d=), e.g. example.com")
    kg.add_argument("selector", help="the selector (s=), e.g. s2026")
    kg.add_argument("--out", required=True, metavar="FILE", help="where to write the PEM key")
    kg.add_argument("--type", choices=("rsa", "ed25519"), default="rsa",
                    help="rsa (default: every verifier knows it) or ed25519 (RFC 8463)")  # fmt: skip
    kg.add_argument("--bits", type=int, default=2048, help="RSA key size (default 2048)")
    kr = ks.add_parser("records", help="print the TXT record of each [[dkim]] key")
    kr.add_argument("--config", metavar="FILE", help="configuration file")

    b = sub.add_parser(
        "bench",
        help="benchmark fastmta against Postfix on loopback (ingest, end-to-end, drain)",
        description="Run benchmarks/bench_ingest.py, bench_e2e.py and/or bench_drain.py from a "
        "source checkout: smtp-source -> MTA (-> smtp-sink), or a held queue let go into "
        "smtp-sink, fastmta against a private Postfix instance (installed when absent). "
        "Prints a table and updates benchmarks/RESULTS.md.",
    )
    b.add_argument(
        "which", nargs="?", choices=["e2e", "ingest", "drain", "all"], default="all",
        help="which benchmark (default: all)",
    )  # fmt: skip
    b.add_argument("--smoke", action="store_true", help="tiny counts, every case, < 60 s")
    b.add_argument("--workers", metavar="N,N", default="2,1", help="fastmta worker counts")
    b.add_argument("--no-postfix", action="store_true", help="measure fastmta only")
    b.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    b.add_argument("--repeat", metavar="N", type=int, default=1, help="rounds; the best is kept")
    return p


# --------------------------------------------------------------------------- helpers


def _err(msg: str) -> None:
    print(f"fastmta: {msg}", file=sys.stderr)


def _load(path: str | None, overrides: dict[str, Any] | None = None) -> Config:
    """load_config with the CLI's error handling (raises SystemExit(2) with a message)."""
    try:
        return load_config(path, overrides)
    except FileNotFoundError:
        _err(f"config file not found: {path}")
        raise SystemExit(EX_CONFIG) from None
    except IsADirectoryError:
        _err(f"config file is a directory: {path}")
        raise SystemExit(EX_CONFIG) from None
    except ConfigError as e:
        _err(str(e))
        raise SystemExit(EX_CONFIG) from None


def _check_keys(config: Config) -> None:
    """The files a worker reads at start ([[dkim]] keys, users file, TLS certificate) can be
    read and used (else SystemExit(2) with a message)."""
    try:
        check_files(config)
    except ConfigError as e:
        _err(str(e))
        raise SystemExit(EX_CONFIG) from None


def _lazy_main(module: str, command: str, args: argparse.Namespace) -> int:
    import importlib

    return int(importlib.import_module(module).main(args) or 0)


# --------------------------------------------------------------------------- serve


def cmd_serve(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {}
    server: dict[str, Any] = {}
    if args.spool:
        server["spool_dir"] = args.spool
    if args.workers is not None:
        server["workers"] = args.workers
    if args.hold:
        server["hold_delivery"] = True
    if server:
        overrides["server"] = server
    if args.listen:
        overrides["listener"] = [{"address": a, "role": "relay"} for a in args.listen]
    if args.relay:
        overrides["delivery"] = {"relayhost": args.relay}
    config = _load(args.config, overrides)
    _check_keys(config)
    from fastmta.app import serve

    def reload() -> Config:
        new = load_config(args.config, overrides)
        check_files(new)
        return new

    return int(serve(config, reload=reload) or 0)


# --------------------------------------------------------------------------- send

_LOCAL_FORBIDDEN = re.compile(r'[\x00-\x20\x7f<>()\[\]\\,;:@"]')
_LABEL = re.compile(r"(?!-)[A-Za-z0-9\-\u0080-\U0010ffff]{1,63}(?<!-)")
_HEADER_NAME = re.compile(rb"[!-9;-~]+[ \t]*:")  # RFC 5322 4.5.2: obs WSP before ":"


def check_address(addr: str, default_domain: str) -> str:
    """Return ``addr`` as a bare mailbox ("user@example.com"), or raise ValueError saying why.

    Surrounding angle brackets are removed; an address without "@" gets ``@default_domain``
    (sendmail behaviour). Limits: local part <= 64 octets (RFC 5321 4.5.3.1.1), domain <= 255
    (4.5.3.1.2), path <= 256 including "<>" (4.5.3.1.3). Non-ASCII is allowed (SMTPUTF8).
    """
    a = addr.strip()
    if a.startswith("<") and a.endswith(">"):
        a = a[1:-1].strip()
    if not a:
        raise ValueError("empty address")
    if "@" not in a:
        a = f"{a}@{default_domain}"
    local, _, domain = a.rpartition("@")
    if not local:
        raise ValueError(f"{addr!r}: empty local part")
    if local.startswith('"') and local.endswith('"') and len(local) >= 2:
        if any(ord(c) < 32 or ord(c) == 127 for c in local):
            raise ValueError(f"{addr!r}: control character in local part")
    elif _LOCAL_FORBIDDEN.search(local) or local.startswith(".") or local.endswith("."):
        raise ValueError(f"{addr!r}: invalid character or dot in local part")
    if len(local.encode()) > 64:
        raise ValueError(f"{addr!r}: local part longer than 64 octets (RFC 5321 4.5.3.1.1)")
    if len(domain.encode()) > 255:
        raise ValueError(f"{addr!r}: domain longer than 255 octets (RFC 5321 4.5.3.1.2)")
    if len(a.encode()) + 2 > 256:
        raise ValueError(f"{addr!r}: address longer than 256 octets (RFC 5321 4.5.3.1.3)")
    if domain.startswith("[") and domain.endswith("]"):
        import ipaddress

        lit = domain[1:-1]
        lit = lit[5:] if lit[:5].lower() == "ipv6:" else lit
        try:
            ipaddress.ip_address(lit)
        except ValueError:
            raise ValueError(f"{addr!r}: bad address literal") from None
    elif not domain or not all(_LABEL.fullmatch(label) for label in domain.rstrip(".").split(".")):
        raise ValueError(f"{addr!r}: invalid domain {domain!r}")
    elif domain.endswith("."):
        raise ValueError(f"{addr!r}: trailing dot in domain {domain!r} (RFC 5321 4.1.2)")
    # Last, the listener's own grammar: what `send` queues must be what RCPT TO would accept
    # (an unbalanced quote such as '"a"b"@x' passes the checks above).
    from fastmta.protocol.errors import ParseError
    from fastmta.protocol.parse import parse_rcpt

    try:
        parse_rcpt(b"TO:<" + a.encode("utf-8", "surrogateescape") + b">", True)
    except ParseError as e:
        raise ValueError(f"{addr!r}: {e.text} (RFC 5321 4.1.2)") from None
    return a


def split_lines(data: bytes) -> list[bytes]:
    """Lines of ``data`` without terminators; CRLF, bare LF and bare CR all end a line (RFC 5321
    2.3.8 allows CR and LF only as CRLF, so bare ones become line ends here)."""
    lines = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return lines


# RFC 5322 2.1.1: a line is at most 998 octets without its CRLF; the listener refuses longer
# ones (limits.max_line_length, 500 5.5.2), and so may the next hop.
MAX_LINE = 998


def fold_long_line(line: bytes, limit: int = MAX_LINE) -> list[bytes]:
    """``line`` (no terminator) as pieces of at most ``limit`` octets, each after the first
    starting with a space: what Postfix's SMTP client does with smtp_line_length_limit
    ("<CR><LF><SPACE>", a header fold that does the least damage to MIME content). A piece never
    ends inside a UTF-8 sequence."""
    pieces: list[bytes] = []
    rest, room = line, limit
    while len(rest) > room:
        cut = room
        while cut > room - 4 and 0x80 <= rest[cut] <= 0xBF:  # a UTF-8 continuation octet
            cut -= 1
        pieces.append(rest[:cut])
        rest, room = b" " + rest[cut:], limit
    pieces.append(rest)
    return pieces


def _header_fields(lines: list[bytes]) -> tuple[list[list[bytes]], list[bytes], bool]:
    """Split into (header fields, each a list of its physical lines; body lines; had separator)."""
    fields: list[list[bytes]] = []
    i = 0
    while i < len(lines):
        ln = lines[i]
        if ln == b"":
            return fields, lines[i + 1 :], True
        if ln[:1] in (b" ", b"\t") and fields:
            fields[-1].append(ln)
        elif _HEADER_NAME.match(ln):
            fields.append([ln])
        else:
            break
        i += 1
    return fields, lines[i:], False


def _field_name(field: list[bytes]) -> bytes:
    return field[0].split(b":", 1)[0].strip().lower()


def _field_value(field: list[bytes]) -> str:
    unfolded = b"".join(field).split(b":", 1)[1]
    return unfolded.decode("utf-8", "replace")


def add_missing_headers(
    fields: list[list[bytes]], *, hostname: str, sender: str, fullname: str | None = None,
    now: float | None = None,
) -> list[list[bytes]]:  # fmt: skip
    """Append From:, Date:, Message-ID: fields when absent (RFC 5322 3.6: From and Date are
    required; Message-ID SHOULD be present). From: uses ``sender`` (skipped for the null sender)."""
    names = {_field_name(f) for f in fields}
    out = list(fields)
    if fullname and any(ord(c) < 32 or ord(c) == 127 for c in fullname):
        raise ValueError("control character in the full name")  # would forge header fields
    if b"from" not in names and sender:
        value = email.utils.formataddr((fullname, sender)) if fullname else sender
        out.append([b"From: " + value.encode()])
    if b"date" not in names:
        out.append([b"Date: " + email.utils.formatdate(now, localtime=True).encode()])
    if b"message-id" not in names:
        out.append([b"Message-ID: " + email.utils.make_msgid(domain=hostname).encode()])
    return out


def prepare_message(
    data: bytes, *, extract: bool, hostname: str, sender: str, fullname: str | None = None,
    now: float | None = None,
) -> tuple[bytes, list[str]]:  # fmt: skip
    """Turn what a program piped to ``fastmta send`` into wire form.

    Returns (wire bytes: CRLF, dot-stuffed, no final ".\\r\\n"; recipients found in To/Cc/Bcc if
    ``extract``, else []). With ``extract`` Bcc fields are removed. A leading mbox "From " line is
    dropped. Missing From/Date/Message-ID are added.
    """
    lines = split_lines(data)
    if lines and lines[0].startswith(b"From "):
        lines = lines[1:]
    fields, body, _ = _header_fields(lines)
    found: list[str] = []
    if extract:
        kept = []
        for f in fields:
            name = _field_name(f)
            if name in (b"to", b"cc", b"bcc"):
                for _, address in email.utils.getaddresses([_field_value(f)]):
                    if address:
                        found.append(address)
            if name != b"bcc":
                kept.append(f)
        fields = kept
    fields = add_missing_headers(
        fields, hostname=hostname, sender=sender, fullname=fullname, now=now
    )
    out = [ln for f in fields for ln in f]
    out.append(b"")  # the header/body separator (RFC 5322 2.1)
    out.extend(body)
    if any(len(ln) > MAX_LINE for ln in out):
        out = [piece for ln in out for piece in fold_long_line(ln)]
    from fastmta.protocol.parse import dot_stuff

    return dot_stuff(b"".join(ln + b"\n" for ln in out), terminate=False), found


def cmd_send(args: argparse.Namespace) -> int:
    overrides = {"server": {"spool_dir": args.spool}} if args.spool else None
    config = _load(args.config, overrides)
    hostname = config.server.hostname
    limit = config.limits.max_message_size
    data = sys.stdin.buffer.read(limit + 1)
    if len(data) > limit:
        _err(f"message too big: more than {limit} bytes (limits.max_message_size)")
        return EX_DATAERR
    nul = data.find(b"\0")
    if nul >= 0:  # RFC 5322 2.3 (no NUL); the listener refuses it: 554 5.6.0
        _err(f"message refused: a NUL octet at byte {nul} (RFC 5322 2.3)")
        return EX_DATAERR

    if args.sender is None:
        sender = f"{getpass.getuser()}@{hostname}"
    elif args.sender.strip() in ("", "<>"):
        sender = ""
    else:
        try:
            sender = check_address(args.sender, hostname)
        except ValueError as e:
            _err(f"bad sender address: {e}")
            return EX_USAGE
    try:
        wire, found = prepare_message(
            data, extract=args.extract, hostname=hostname, sender=sender, fullname=args.fullname
        )
    except ValueError as e:  # a full name (-F) that would forge header fields
        _err(f"bad full name (-F): {e}: CR, LF and other controls are not allowed")
        return EX_USAGE
    if config.dkim:  # signed here, as the server signs what its trusted clients send
        from fastmta.dkim import Signers

        try:
            signer = Signers.from_config(config.dkim).for_message(wire)
        except ValueError as e:
            hint = " (fastmta send signs with it: run it as the server's user)"
            _err(f"config error: {e}{hint if 'cannot read' in str(e) else ''}")
            return EX_CONFIG
        if signer is not None:
            wire = signer.sign(wire) + wire
    if len(wire) > limit:
        _err(f"message too big: {len(wire)} bytes > {limit} (limits.max_message_size)")
        return EX_DATAERR
    from fastmta.headers import header_block_end, hop_count, message_id

    head = header_block_end([wire])[0]
    hops = hop_count(head)
    if hops > config.limits.max_hops:
        _err(f"message refused: {hops} Received: header fields, over limits.max_hops "
             f"({config.limits.max_hops}): a mail loop?")  # fmt: skip
        return EX_DATAERR
    recipients: list[str] = []
    for raw in [*args.recipients, *found]:
        for part in raw.split(","):  # sendmail accepts "a@x,b@y"
            if not part.strip():
                continue
            try:
                address = check_address(part, hostname)
            except ValueError as e:
                _err(f"bad recipient address: {e}")
                return EX_USAGE
            if address.lower() not in {r.lower() for r in recipients}:
                recipients.append(address)
    if not recipients:
        _err("no recipients (give addresses, or -t to read To:/Cc:/Bcc:)")
        return EX_USAGE

    from fastmta.aliases import AliasError, Aliases
    from fastmta.spool.inject import inject
    from fastmta.spool.records import Envelope, Recipient, new_queue_id

    try:
        expanded = Aliases.from_config(config).recipients(Recipient(r) for r in recipients)
    except AliasError as e:
        _err(f"could not queue the message: {e} (limits.max_alias_expansion)")
        return EX_TEMPFAIL
    smtputf8 = not (sender.isascii() and all(r.address.isascii() for r in expanded))
    envelope = Envelope(
        id=new_queue_id(),
        sender=sender,
        recipients=expanded,
        arrival=time.time(),
        size=len(wire),
        body=None if wire.isascii() else "8BITMIME",
        smtputf8=smtputf8,
        client=f"local (uid {os.getuid()})",
        message_id=message_id(head),
    )
    try:
        queue_id = inject(config.server.spool_dir, envelope, wire)
    except Exception as e:  # SpoolError (or OSError): the message is not queued
        _err(f"could not queue the message: {e}")
        return EX_TEMPFAIL
    print(queue_id)
    return 0


# --------------------------------------------------------------------------- passwd, config


def cmd_passwd(args: argparse.Namespace) -> int:
    from fastmta.auth import set_password

    path = args.file
    if not path:
        path = _load(args.config).policy.users_file if args.config else ""
    if not path:
        _err("passwd: no users file: give --file USERS_FILE (or --config with policy.users_file)")
        return EX_CONFIG
    if sys.stdin.isatty():
        password = getpass.getpass(f"New password for {args.user}: ")
        if getpass.getpass("Again: ") != password:
            _err("passwd: the passwords differ")
            return 1
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    try:
        set_password(path, args.user, password)
    except ValueError as e:
        _err(f"passwd: {e}")
        return EX_USAGE
    except OSError as e:
        _err(f"passwd: {path}: {e.strerror or e}")
        return 1
    print(f"{args.user}: password set in {path}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    if args.example:
        sys.stdout.write(dump_example())
        return 0
    if args.route and not args.check:
        _err("config: --route needs --check FILE")
        return EX_USAGE
    config = _load(args.check)
    _check_keys(config)
    print(f"{args.check}: OK")
    for address in args.route or ():
        print("\n".join(explain_route(config, address)))
    return 0


def explain_route(config: Config, address: str) -> list[str]:
    """Lines saying where mail to ``address`` goes under ``config`` (`fastmta config --route`):
    its [aliases] expansion, then for each final address its local mailbox or next hop."""
    from fastmta.aliases import AliasError, Aliases
    from fastmta.delivery.maildir import MaildirDelivery
    from fastmta.delivery.routing import Router

    try:
        targets = Aliases.from_config(config).expand(address)
    except AliasError as e:
        return [f"{address}: {e}"]
    router = Router(config)
    maildir = MaildirDelivery.from_config(config.local)
    lines = [] if targets == [address] else [f"{address}: an alias of {len(targets)} address(es)"]
    for target in targets:
        _, at, domain = target.rpartition("@")
        if not at or not domain:
            lines.append(f"{target}: not an address with a domain")
            continue
        route = router.route(domain)
        if route.kind == "local":
            refused = maildir.check(target)
            where = (
                f"refused at RCPT: {' '.join(map(str, refused))}"
                if refused
                else f"local Maildir {maildir.maildir_path(target)}"
            )
        else:
            hop = (
                f"host [{route.lookup}]:{route.port}" if route.bracketed
                else f"MX hosts of {route.lookup}, port {route.port}"
            )  # fmt: skip
            if config.delivery.relayhost and route.lookup != domain.lower():
                hop = f"relayhost {hop}"
            elif domain.rstrip(".") in config.domain and config.domain[domain.rstrip(".")].route:
                hop = f'[domain."{domain.rstrip(".")}"] route: {hop}'
            where = f"{hop}, TLS {route.tls}"
            if route.auth:
                where += f", AUTH as {route.auth[0]}"
            if route.sts:
                where += ", MTA-STS policy applies"
        lines.append(f"{'  -> ' if len(lines) else ''}{target}: {where}")
    return lines


def cmd_dkim(args: argparse.Namespace) -> int:
    from fastmta import dkim

    try:
        if args.dkim_command == "records":
            config = _load(args.config)
            if not config.dkim:
                _err("dkim records: no [[dkim]] table in the configuration")
                return EX_CONFIG
            for i, entry in enumerate(config.dkim):
                try:
                    with open(entry.key_file, "rb") as f:
                        key, _ = dkim.load_key(f.read())
                except (OSError, ValueError) as e:
                    _err(f"config error: dkim[{i}].key_file: {entry.key_file}: {e}")
                    return EX_CONFIG
                domain = entry.domain.rstrip(".").lower()
                print(dkim.zone_line(domain, entry.selector, dkim.dns_record(key)))
            return 0
        domain = args.domain.rstrip(".").lower()
        if not DNS_NAME.fullmatch(domain) or not DNS_NAME.fullmatch(args.selector):
            _err("dkim keygen: give a domain like example.com and a selector like s2026")
            return EX_USAGE
        if args.type == "rsa" and not 1024 <= args.bits <= 8192:
            _err("dkim keygen: --bits must be 1024..8192 (2048 advised; RFC 8301)")
            return EX_USAGE
        if os.path.exists(args.out):
            _err(f"dkim keygen: {args.out} exists; not overwritten")
            return EX_USAGE
        pem = dkim.new_key(args.type, args.bits)
        fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        key, _ = dkim.load_key(pem)
    except ValueError as e:  # cryptography is not installed
        _err(f"dkim: {e}")
        return EX_CONFIG
    except OSError as e:
        _err(f"dkim keygen: cannot write {args.out}: {e.strerror}")
        return EX_CANTCREAT
    print(f"; publish in DNS:\n{dkim.zone_line(domain, args.selector, dkim.dns_record(key))}")
    print(f'\n# add to the configuration:\n[[dkim]]\ndomain = "{domain}"')
    print(f'selector = "{args.selector}"\nkey_file = "{os.path.abspath(args.out)}"')
    return 0


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fastmta`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "send":
            return cmd_send(args)
        if args.command == "passwd":
            return cmd_passwd(args)
        if args.command == "config":
            return cmd_config(args)
        if args.command == "dkim":
            return cmd_dkim(args)
        if args.command == "queue":
            return _lazy_main("fastmta.queuecmd", "queue", args)
        if args.command == "bench":
            return _lazy_main("fastmta.bench", "bench", args)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    except KeyboardInterrupt:
        return 130
    parser.print_help()
    return EX_USAGE


if __name__ == "__main__":
    sys.exit(main())
