"""fastmta configuration: msgspec Structs loaded from TOML.

Every field has a default that works as is, so ``load_config(None)`` gives a runnable relay on
127.0.0.1:2525. A TOML file only needs the keys it changes. Unknown keys are errors (a typo must not
silently fall back to a default), and every error names the key::

    config error: limits.max_recipients: must be >= 100 (RFC 5321 4.5.3.1.8), got 10

Durations are numbers (seconds) or strings such as ``"30s"``, ``"5m"``, ``"2h"``, ``"5d"``,
``"1h30m"``, ``"250ms"``; sizes are integers (bytes) or strings such as ``"10k"``, ``"50M"``,
``"1G"`` (binary multiples: 1k = 1024). Both arrive in the Structs as plain numbers (``Duration``
is a ``float`` subclass, ``Size`` an ``int`` subclass).

``load_config`` = parse TOML -> merge overrides -> ``msgspec.convert`` (types, unknown keys) ->
``validate`` (values, cross-field rules) -> ``resolve`` (fill the "" / 0 = automatic defaults).
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import tomllib
from importlib import resources
from typing import Any

import msgspec

__all__ = [
    "DKIM_HEADERS",
    "DNS_NAME",
    "Config",
    "ConfigError",
    "DeliveryConfig",
    "DkimConfig",
    "DnsConfig",
    "DomainPolicy",
    "Duration",
    "LimitsConfig",
    "Listener",
    "LocalConfig",
    "PolicyConfig",
    "QueueConfig",
    "ServerConfig",
    "Size",
    "TlsConfig",
    "check_dkim_keys",
    "check_files",
    "dump_example",
    "load_config",
    "parse_duration",
    "parse_hostport",
    "parse_size",
    "resolve",
    "validate",
]


class ConfigError(Exception):
    """A configuration problem; the message starts with ``config error: <key>:``."""


# --------------------------------------------------------------------------- value types


# The header fields DKIM signs by default (fastmta/dkim.py keeps the same list).
DKIM_HEADERS = (
    "from", "reply-to", "subject", "date", "to", "cc", "message-id", "in-reply-to",
    "references", "mime-version", "content-type", "content-transfer-encoding",
    "list-id", "list-unsubscribe", "list-unsubscribe-post", "sender",
)  # fmt: skip
# A domain name or a single label (a selector), ASCII letters, digits, "-" and "_".
DNS_NAME = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9_-]{1,63}(?<!-))*")


class Duration(float):
    """Seconds, as a float. TOML may give a number or a string like "1h30m"."""


class Size(int):
    """Bytes, as an int. TOML may give an integer or a string like "50M"."""


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_duration(value: int | float | str) -> float:
    """Seconds from a number or a string of number+unit parts ("90", "30s", "1h30m", "250ms").

    Raises ValueError for anything else (negative numbers included).
    """
    if isinstance(value, bool):
        raise ValueError(f'expected a duration like 30, "30s", "5m", "1h30m", got {value!r}')
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"a duration must be >= 0, got {value!r}")
        return float(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if re.fullmatch(r"\d+(?:\.\d+)?", text):
            return float(text)
        pos, total = 0, 0.0
        for m in _DURATION_PART.finditer(text):
            if m.start() != pos:
                break
            total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
            pos = m.end()
        if text and pos == len(text):
            return total
    raise ValueError(f'expected a duration like 30, "30s", "5m", "1h30m", got {value!r}')


def parse_size(value: int | str) -> int:
    """Bytes from an integer or a string ("10k", "50M", "1G", "50MiB"; binary multiples).

    Raises ValueError for anything else (negative numbers included).
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"a size must be >= 0, got {value!r}")
        return value
    if isinstance(value, str):
        m = _SIZE.fullmatch(value.strip())
        if m:
            return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
    raise ValueError(f'expected a size like 52428800, "10k", "50M", got {value!r}')


def _dec_hook(typ: type, obj: Any) -> Any:
    if typ is Duration:
        return Duration(parse_duration(obj))
    if typ is Size:
        return Size(parse_size(obj))
    raise NotImplementedError(typ)


# --------------------------------------------------------------------------- sections

_STRUCT = {"forbid_unknown_fields": True, "kw_only": True}

# Outbound TLS (delivery.tls, per domain too). Postfix smtp_tls_security_level: may, none,
# encrypt, verify (a certificate that chains to a trusted CA and names the MX host).
TLS_MODES = ("opportunistic", "none", "required", "verify")


class ServerConfig(msgspec.Struct, **_STRUCT):
    hostname: str = ""  # "" -> socket.getfqdn()
    workers: int = 0  # 0 -> os.cpu_count()
    spool_dir: str = ""  # "" -> $FASTMTA_SPOOL, $XDG_STATE_HOME/fastmta/spool, ./fastmta-spool
    hold_delivery: bool = False
    soft_bounce: bool = False  # 5xx becomes 4xx: nothing bounces or is refused for good
    commit_delay: Duration = Duration(0.002)  # group-commit wait under load (0 = sync at once)
    compact_interval: Duration = Duration(30.0)  # how often sparse segments are compacted; 0: never
    compact_below: float = 0.25  # compact a sealed segment whose live messages fill less than this
    compact_max_bytes: Size = Size(16 << 20)  # message bytes moved per compaction round
    log_level: str = "info"
    log_file: str = ""  # "" -> stderr
    delivery_log: str = ""  # "" -> <spool_dir>/delivery.log
    metrics_listen: str = ""  # "" -> no metrics endpoint; "127.0.0.1:9125" -> GET /metrics


class Listener(msgspec.Struct, **_STRUCT):
    address: str = "127.0.0.1:2525"
    role: str = "relay"  # "relay" | "submission"
    tls: str = (
        "auto"  # "auto" | "none" | "starttls" | "implicit"; auto -> starttls if [tls] has a cert
    )
    auth: str = "tls"  # "tls" | "always" | "never"
    bare_newline: str = "reject"  # "reject" | "normalize"

    @property
    def host(self) -> str:
        return parse_hostport(self.address, 25)[0]

    @property
    def port(self) -> int:
        return parse_hostport(self.address, 25)[1]


class TlsConfig(msgspec.Struct, **_STRUCT):
    cert_file: str = ""
    key_file: str = ""


class LimitsConfig(msgspec.Struct, **_STRUCT):
    max_connections: int = 1000
    max_connections_per_ip: int = 50
    max_recipients: int = 1000
    max_message_size: Size = Size(50 << 20)
    max_line_length: int = 1000
    max_command_line: int = 512
    max_auth_line: int = 12288
    command_timeout: Duration = Duration(300)
    data_timeout: Duration = Duration(600)
    max_errors: int = 20  # protocol errors and refused MAIL/RCPT (smtpd_hard_error_limit)
    auth_failure_delay: Duration = Duration(1)
    max_auth_failures: int = 3
    greet_pause: Duration = Duration(0)  # 0 = greet at once
    max_alias_expansion: int = 1000  # final addresses one recipient may expand to ([aliases])
    max_hops: int = 100  # Received: fields a message may already have (RFC 5321 6.3: loops)


class PolicyConfig(msgspec.Struct, **_STRUCT):
    mynetworks: list[str] = msgspec.field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    local_domains: list[str] = msgspec.field(default_factory=list)
    relay_domains: list[str] = msgspec.field(default_factory=list)  # anyone may send to them
    relay_recipients: list[str] = msgspec.field(default_factory=list)  # "u@d", "@d": known ones
    users_file: str = ""


class LocalConfig(msgspec.Struct, **_STRUCT):
    maildir_root: str = ""  # "" -> <spool_dir>/../maildir
    users: list[str] = msgspec.field(default_factory=list)  # "user@domain" entries
    catch_all: str = ""
    recipient_delimiter: str = "+"  # user+detail@domain is delivered to user ("" = off)

    def users_by_domain(self) -> dict[str, set[str]]:
        """``{"example.com": {"alice", "bob"}}`` from the ``users`` list (lower-cased)."""
        out: dict[str, set[str]] = {}
        for entry in self.users:
            user, _, domain = entry.rpartition("@")
            out.setdefault(domain.lower(), set()).add(user.lower())
        return out


class DnsConfig(msgspec.Struct, **_STRUCT):
    nameservers: list[str] = msgspec.field(default_factory=list)
    min_ttl: Duration = Duration(60)
    max_ttl: Duration = Duration(86400)
    negative_ttl: Duration = Duration(300)
    timeout: Duration = Duration(5)
    prefer_ipv6: bool = False


_DEFAULT_RETRY = ["5m", "10m", "20m", "40m", "1h20m", "2h40m", "4h"]


class QueueConfig(msgspec.Struct, **_STRUCT):
    retry_schedule: list[Duration] = msgspec.field(
        default_factory=lambda: [Duration(parse_duration(s)) for s in _DEFAULT_RETRY]
    )
    retry_jitter: float = 0.2
    max_lifetime: Duration = Duration(5 * 86400)
    delay_warning: Duration = Duration(4 * 3600)
    max_in_memory: int = 10000
    max_resident: int = 100_000
    park_batch: int = 1000
    recipients_per_transaction: int = 50


class DeliveryConfig(msgspec.Struct, **_STRUCT):
    port: int = 25
    helo_name: str = ""  # "" -> server.hostname
    tls: str = "opportunistic"  # "opportunistic" | "none" | "required" | "verify"
    tls_verify: bool = False
    tls_ca_file: str = ""  # "" -> the system CAs
    mta_sts: bool = True  # RFC 8461
    mta_sts_port: int = 443  # HTTPS port of mta-sts.<domain> (443; tests change it)
    connect_timeout: Duration = Duration(30)
    greeting_timeout: Duration = Duration(300)
    mail_timeout: Duration = Duration(300)
    rcpt_timeout: Duration = Duration(300)
    data_timeout: Duration = Duration(120)
    data_block_timeout: Duration = Duration(180)
    data_done_timeout: Duration = Duration(600)
    idle_timeout: Duration = Duration(30)
    max_connections_per_site: int = 20
    messages_per_connection: int = 1000
    messages_per_second: float = 0.0  # 0 = unlimited
    chain_transactions: bool = True
    backlog_per_connection: int = 32
    chain_wait: Duration = Duration(0.05)
    relayhost: str = ""
    relay_username: str = ""
    relay_password: str = ""
    source_address: str = ""


class EgressSource(msgspec.Struct, **_STRUCT):
    """One local address to send from (KumoMTA: an egress source of the egress pool)."""

    address: str = ""  # local IP address connections are made from
    helo_name: str = ""  # EHLO name for connections from it ("" -> delivery.helo_name)
    weight: int = 1  # share of the transactions, relative to the other sources


class DkimConfig(msgspec.Struct, **_STRUCT):
    domain: str = ""  # d=: signs mail whose From: is at this domain or a subdomain of it
    selector: str = ""  # s=: the public key is a TXT record at <selector>._domainkey.<domain>
    key_file: str = ""  # PEM private key, RSA (2048 bits or more advised) or Ed25519
    headers: list[str] = msgspec.field(default_factory=lambda: list(DKIM_HEADERS))
    canonicalization: str = "relaxed/relaxed"  # header/body: relaxed or simple each
    oversign: list[str] = msgspec.field(default_factory=lambda: ["from"])


class DomainPolicy(msgspec.Struct, **_STRUCT):
    """Per-destination-domain overrides; None = inherit from [delivery] (or all [[egress]])."""

    max_connections: int | None = None
    messages_per_second: float | None = None
    messages_per_connection: int | None = None
    tls: str | None = None
    chain_transactions: bool | None = None
    backlog_per_connection: int | None = None
    recipients_per_transaction: int | None = None  # queue.recipients_per_transaction here
    chain_wait: Duration | None = None
    mta_sts: bool | None = None
    egress: list[str] | None = None  # addresses of [[egress]] sources to send from
    route: str | None = None  # "[10.1.2.3]:2525" or "host:port"

    def has_own_limits(self) -> bool:
        """True when anything but the route (or MTA-STS) is overridden: the domain then gets a
        delivery site of its own, so its limits never apply to other domains sharing its MX
        hosts."""
        return any(
            getattr(self, f) is not None
            for f in self.__struct_fields__
            if f not in ("route", "mta_sts", "egress", "recipients_per_transaction")
        )


class Config(msgspec.Struct, **_STRUCT):
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    listener: list[Listener] = msgspec.field(default_factory=lambda: [Listener()])
    tls: TlsConfig = msgspec.field(default_factory=TlsConfig)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    policy: PolicyConfig = msgspec.field(default_factory=PolicyConfig)
    local: LocalConfig = msgspec.field(default_factory=LocalConfig)
    dns: DnsConfig = msgspec.field(default_factory=DnsConfig)
    queue: QueueConfig = msgspec.field(default_factory=QueueConfig)
    delivery: DeliveryConfig = msgspec.field(default_factory=DeliveryConfig)
    domain: dict[str, DomainPolicy] = msgspec.field(default_factory=dict)
    dkim: list[DkimConfig] = msgspec.field(default_factory=list)
    egress: list[EgressSource] = msgspec.field(default_factory=list)
    aliases: dict[str, list[str]] = msgspec.field(default_factory=dict)  # see fastmta/aliases.py
    # class -> regexes tried before the built-in bounce classification (delivery/classify.py)
    bounce_rules: dict[str, list[str]] = msgspec.field(default_factory=dict)

    @property
    def listeners(self) -> list[Listener]:
        """The listeners with ``tls = "auto"`` resolved (after ``resolve`` they already are)."""
        auto = "starttls" if self.tls.cert_file else "none"
        return [
            msgspec.structs.replace(li, tls=auto) if li.tls == "auto" else li
            for li in self.listener
        ]


SECTIONS: dict[str, type[msgspec.Struct]] = {
    "server": ServerConfig,
    "listener": Listener,
    "tls": TlsConfig,
    "limits": LimitsConfig,
    "policy": PolicyConfig,
    "local": LocalConfig,
    "dns": DnsConfig,
    "queue": QueueConfig,
    "delivery": DeliveryConfig,
    "domain": DomainPolicy,
    "dkim": DkimConfig,
    "egress": EgressSource,
}


# --------------------------------------------------------------------------- host:port


def parse_hostport(s: str, default_port: int) -> tuple[str, int]:
    """Split "host:port", "[::1]:25", "[10.0.0.1]:2525", "host", "::1" into (host, port).

    Brackets are removed from the host. A bare IPv6 address without brackets takes the default
    port. Raises ValueError on an empty host or a port outside 1..65535.
    """
    text = s.strip()
    port_text = ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"missing ']' in {s!r}")
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"unexpected {rest!r} after ']' in {s!r}")
            port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host = text  # "host" or a bare IPv6 address
    if not host:
        raise ValueError(f"missing host in {s!r}")
    if port_text == "" and text.endswith(":"):
        raise ValueError(f"missing port in {s!r}")
    port = default_port
    if port_text:
        if not port_text.isdigit():
            raise ValueError(f"bad port {port_text!r} in {s!r}")
        port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"port must be 1..65535, got {port} in {s!r}")
    return host, port


# --------------------------------------------------------------------------- loading


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


_MSGSPEC_PATH = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
_UNKNOWN = re.compile(r"Object contains unknown field `(?P<key>[^`]*)`")


def _translate(err: msgspec.ValidationError, prefix: str = "") -> ConfigError:
    m = _MSGSPEC_PATH.match(str(err))
    assert m is not None
    msg, path = m.group("msg"), prefix + (m.group("path") or "")
    path = path.lstrip(".")
    unknown = _UNKNOWN.match(msg)
    if unknown:
        key = f"{path}.{unknown.group('key')}" if path else unknown.group("key")
        return ConfigError(f"config error: {key}: unknown key")
    msg = msg.replace("`", "")
    if msg.startswith("Expected"):
        msg = ("e" + msg[1:]).replace(" | null", "").replace("expected object", "expected a table")
    return ConfigError(f"config error: {path or '(top level)'}: {msg}")


def load_config(
    path: str | os.PathLike[str] | None, overrides: dict[str, Any] | None = None
) -> Config:
    """Load, validate and resolve a configuration.

    ``path=None`` gives the built-in defaults. ``overrides`` is a dict shaped like the TOML
    document (e.g. ``{"server": {"spool_dir": "/x"}}``) merged over the file before validation, so
    command-line overrides get the same checks and messages. Raises ConfigError (message names
    the key) or FileNotFoundError if ``path`` does not exist.
    """
    data: dict[str, Any] = {}
    if path is not None:
        with open(path, "rb") as f:
            raw = f.read()
        try:
            # decoded here, not by tomllib.load: its UnicodeDecodeError is no ConfigError, and a
            # SIGHUP reload must see every bad file as a configuration problem (TOML is UTF-8)
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"config error: {os.fspath(path)}: not UTF-8 at byte {e.start} "
                f"(TOML files are UTF-8)"
            ) from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config error: {os.fspath(path)}: invalid TOML: {e}") from None
    if overrides:
        data = _merge(data, overrides)
    # [domain."x"] tables are converted one by one: msgspec hides dict keys in its error paths
    # ("domain[...]"), and the message must name the domain.
    domains_raw = data.pop("domain", {})
    aliases_raw = data.pop("aliases", {})
    if not isinstance(domains_raw, dict):
        raise _fail("domain", 'expected tables like [domain."example.com"]')
    try:
        config = msgspec.convert(data, Config, dec_hook=_dec_hook)
    except msgspec.ValidationError as e:
        raise _translate(e) from None
    domains: dict[str, DomainPolicy] = {}
    for name, entry in domains_raw.items():
        try:
            domains[name] = msgspec.convert(entry, DomainPolicy, dec_hook=_dec_hook)
        except msgspec.ValidationError as e:
            raise _translate(e, f'domain."{name}"') from None
    config = msgspec.structs.replace(config, domain=domains, aliases=_aliases(aliases_raw))
    validate(config)
    return resolve(config)


def _aliases(raw: Any) -> dict[str, list[str]]:
    """The [aliases] table: "key" = "target@domain" or ["a@x", "b@y"]; every error names the key."""
    if not isinstance(raw, dict):
        raise _fail("aliases", 'expected a table: [aliases] then "user@example.com" = "a@b.org"')
    out: dict[str, list[str]] = {}
    for key, value in raw.items():
        where = f'aliases."{key}"'
        local, at, domain = key.rpartition("@")
        if not key or any(c.isspace() or c in "<>" for c in key) or (at and not domain):
            raise _fail(where, 'expected a key "user@domain", "user" or "@domain"')
        targets = [value] if isinstance(value, str) else value
        if not isinstance(targets, list) or not targets:
            raise _fail(where, 'expected an address or a non-empty list: "a@b.org", ["a@b", "c@d"]')
        for t in targets:
            if not isinstance(t, str) or not _ADDRESS.fullmatch(t):
                raise _fail(where, f'expected addresses "user@domain", got {t!r}')
        if key.lower() in out:
            raise _fail(where, "given twice (keys are case-insensitive)")
        out[key.lower()] = targets
    return out


def dump_example() -> str:
    """The annotated example configuration (fastmta/fastmta.example.toml) as text."""
    return resources.files("fastmta").joinpath("fastmta.example.toml").read_text("utf-8")


def resolve(config: Config, env: dict[str, str] | None = None) -> Config:
    """Return a copy with the automatic defaults ("" / 0 / "auto") filled in.

    hostname -> socket.getfqdn(); workers -> os.cpu_count(); spool_dir -> $FASTMTA_SPOOL, else
    $XDG_STATE_HOME/fastmta/spool, else ./fastmta-spool (made absolute); delivery_log ->
    <spool_dir>/delivery.log; maildir_root -> <spool_dir>/../maildir; helo_name -> hostname;
    listener tls "auto" -> "starttls" with a [tls] cert, else "none".
    """
    env = os.environ if env is None else env  # type: ignore[assignment]
    s = config.server
    hostname = s.hostname or socket.getfqdn()
    spool = s.spool_dir or env.get("FASTMTA_SPOOL", "")
    if not spool:
        xdg = env.get("XDG_STATE_HOME", "")
        spool = os.path.join(xdg, "fastmta", "spool") if xdg else "fastmta-spool"
    spool = os.path.abspath(os.path.expanduser(spool))
    server = msgspec.structs.replace(
        s,
        hostname=hostname,
        workers=s.workers or os.cpu_count() or 1,
        spool_dir=spool,
        delivery_log=s.delivery_log or os.path.join(spool, "delivery.log"),
    )
    local = msgspec.structs.replace(
        config.local,
        maildir_root=config.local.maildir_root
        or os.path.normpath(os.path.join(spool, os.pardir, "maildir")),
    )
    delivery = msgspec.structs.replace(
        config.delivery, helo_name=config.delivery.helo_name or hostname
    )
    domain = {name.lower().rstrip("."): pol for name, pol in config.domain.items()}
    return msgspec.structs.replace(
        config,
        server=server,
        local=local,
        delivery=delivery,
        listener=config.listeners,
        domain=domain,
    )


# --------------------------------------------------------------------------- validation


def _fail(key: str, msg: str) -> ConfigError:
    return ConfigError(f"config error: {key}: {msg}")


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        options = (
            " or ".join(f'"{a}"' for a in allowed)
            if len(allowed) == 2
            else ", ".join(f'"{a}"' for a in allowed)
        )
        raise _fail(key, f'expected {options}, got "{value}"')


def _at_least(key: str, value: float, minimum: float, why: str = "") -> None:
    if value < minimum:
        got = int(value) if float(value).is_integer() else value
        low = int(minimum) if float(minimum).is_integer() else minimum
        raise _fail(key, f"must be >= {low}{f' ({why})' if why else ''}, got {got}")


def _positive(key: str, value: float) -> None:
    if not value > 0:
        raise _fail(key, f"must be > 0, got {value}")


def _hostport(key: str, value: str, default_port: int) -> None:
    try:
        parse_hostport(value, default_port)
    except ValueError as e:
        raise _fail(key, str(e)) from None


def _ip(key: str, value: str) -> None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise _fail(key, f'expected an IP address, got "{value}"') from None


_ADDRESS = re.compile(r"[^@\s<>]+@[^@\s<>]+")
_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
# Each worker is a process with its own spool shard and sockets, and the supervisor sizes shared
# connection counters by the count: far more than the CPUs only costs memory and file descriptors.
MAX_WORKERS = 256


def _host_name(key: str, value: str) -> None:
    """A name for the greeting and EHLO: a domain name or an address literal ("[192.0.2.1]").
    It goes into SMTP lines as is, so a space, CR or LF would forge protocol text."""
    if not value:
        return  # "" = automatic (resolve)
    name = value.rstrip(".")
    if DNS_NAME.fullmatch(name) and len(name) <= 255:
        return
    if value.startswith("[") and value.endswith("]"):
        literal = value[1:-1]
        literal = literal[5:] if literal[:5].lower() == "ipv6:" else literal
        try:
            ipaddress.ip_address(literal)
            return
        except ValueError:
            pass
    raise _fail(key, f'expected a host name like "mx.example.com", got {value!r}')


def validate(config: Config) -> None:
    """Check values and cross-field rules; raise ConfigError naming the first bad key.

    Types and unknown keys are already checked by msgspec; this is every value rule, in one place.
    Timeouts only need to be > 0 here: RFC 5321 4.5.3.2 minimums are the defaults, and tests run
    with short ones.
    """
    s = config.server
    _at_least("server.workers", s.workers, 0)
    if s.workers > MAX_WORKERS:
        raise _fail("server.workers", f"must be <= {MAX_WORKERS} (0: one per CPU), got {s.workers}")
    _host_name("server.hostname", s.hostname)
    if not 0 <= s.commit_delay <= 0.1:
        raise _fail("server.commit_delay", f"must be between 0 and 100ms, got {s.commit_delay:g}s")
    _choice("server.log_level", s.log_level.lower(), _LOG_LEVELS)
    if s.metrics_listen:
        _hostport("server.metrics_listen", s.metrics_listen, 9125)
    if s.compact_interval < 0:
        raise _fail(
            "server.compact_interval", f"must be >= 0 (0: never), got {s.compact_interval:g}s"
        )
    if not 0 < s.compact_below < 1:
        raise _fail("server.compact_below", f"must be between 0 and 1, got {s.compact_below:g}")
    _at_least("server.compact_max_bytes", s.compact_max_bytes, 1)

    if not config.listener:
        raise _fail("listener", "at least one [[listener]] is required")
    has_cert = bool(config.tls.cert_file)
    for i, li in enumerate(config.listener):
        k = f"listener[{i}]"
        _hostport(f"{k}.address", li.address, 25)
        _choice(f"{k}.role", li.role, ("relay", "submission"))
        _choice(f"{k}.tls", li.tls, ("auto", "none", "starttls", "implicit"))
        _choice(f"{k}.auth", li.auth, ("tls", "always", "never"))
        _choice(f"{k}.bare_newline", li.bare_newline, ("reject", "normalize"))
        tls = li.tls if li.tls != "auto" else ("starttls" if has_cert else "none")
        if tls != "none" and not has_cert:
            raise _fail(f"{k}.tls", f'"{li.tls}" needs [tls] cert_file and key_file')
        if li.role == "submission" and (li.auth == "never" or (li.auth == "tls" and tls == "none")):
            raise _fail(
                f"{k}.auth",
                'a submission listener needs AUTH (RFC 6409 4.3): set auth = "always", '
                'or configure TLS so auth = "tls" can offer it',
            )
        if (li.role == "submission" or li.auth == "always") and not config.policy.users_file:
            # without users AUTH is never offered, and every MAIL would get 530
            raise _fail(
                "policy.users_file",
                f"{k} ({li.role}, auth {li.auth}) needs AUTH users: set policy.users_file "
                "(`fastmta passwd USER --file FILE` makes one)",
            )
    seen: set[tuple[str, int]] = set()
    for i, li in enumerate(config.listener):
        hp = parse_hostport(li.address, 25)
        if hp in seen:
            raise _fail(f"listener[{i}].address", f'"{li.address}" is listed twice')
        seen.add(hp)

    t = config.tls
    if bool(t.cert_file) != bool(t.key_file):
        raise _fail(
            "tls.key_file" if t.cert_file else "tls.cert_file", "cert_file and key_file go together"
        )
    for key, value in (("tls.cert_file", t.cert_file), ("tls.key_file", t.key_file)):
        if value and not os.path.isfile(value):
            raise _fail(key, f"file not found: {value}")

    lim = config.limits
    _at_least("limits.max_connections", lim.max_connections, 1)
    _at_least("limits.max_connections_per_ip", lim.max_connections_per_ip, 1)
    _at_least("limits.max_recipients", lim.max_recipients, 100, "RFC 5321 4.5.3.1.8")
    _at_least("limits.max_message_size", lim.max_message_size, 65536, "RFC 5321 4.5.3.1.7")
    _at_least("limits.max_line_length", lim.max_line_length, 1000, "RFC 5321 4.5.3.1.6")
    _at_least("limits.max_command_line", lim.max_command_line, 512, "RFC 5321 4.5.3.1.4")
    _at_least("limits.max_auth_line", lim.max_auth_line, 12288, "RFC 4954 4")
    _positive("limits.command_timeout", lim.command_timeout)
    _positive("limits.data_timeout", lim.data_timeout)
    _at_least("limits.max_errors", lim.max_errors, 1)
    _at_least("limits.max_auth_failures", lim.max_auth_failures, 1)

    for i, net in enumerate(config.policy.mynetworks):
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise _fail(
                f"policy.mynetworks[{i}]", f'expected a CIDR like "10.0.0.0/8", got "{net}"'
            ) from None
    for key in ("local_domains", "relay_domains"):
        for i, dom in enumerate(getattr(config.policy, key)):
            if not dom.strip(".") or any(c.isspace() or c in "@[]" for c in dom):
                raise _fail(f"policy.{key}[{i}]", f'expected a domain name, got "{dom}"')
    local = {d.strip().rstrip(".").lower() for d in config.policy.local_domains}
    for i, dom in enumerate(config.policy.relay_domains):
        if dom.strip().rstrip(".").lower() in local:
            raise _fail(
                f"policy.relay_domains[{i}]",
                f'"{dom}" is in policy.local_domains too: delivered here or relayed on, not both',
            )

    relay = {d.strip().rstrip(".").lower() for d in config.policy.relay_domains}
    for i, entry in enumerate(config.policy.relay_recipients):
        user, at, dom = entry.rpartition("@")
        if not at or not dom or any(c.isspace() or c in "<>" for c in entry):
            raise _fail(
                f"policy.relay_recipients[{i}]",
                f'expected "user@domain" or "@domain", got "{entry}"',
            )
        if dom.rstrip(".").lower() not in relay:
            raise _fail(
                f"policy.relay_recipients[{i}]",
                f'"{dom}" is not in policy.relay_domains (an exact entry there)',
            )
    for i, user in enumerate(config.local.users):
        if not _ADDRESS.fullmatch(user):
            raise _fail(f"local.users[{i}]", f'expected "user@domain", got "{user}"')
    if config.local.catch_all and not _ADDRESS.fullmatch(config.local.catch_all):
        raise _fail("local.catch_all", f'expected "user@domain", got "{config.local.catch_all}"')

    rd = config.local.recipient_delimiter
    if len(rd) > 1 or rd in ("@", ".", '"', "\\") or rd.isspace() or rd.isalnum():
        raise _fail(
            "local.recipient_delimiter",
            f'expected one character such as "+" or "-" ("" = off), got "{rd}"',
        )
    _at_least("limits.max_alias_expansion", lim.max_alias_expansion, 1)
    _at_least("limits.max_hops", lim.max_hops, 1)
    if config.aliases:
        from fastmta.aliases import AliasError, Aliases

        table = Aliases.from_config(config)
        for key in config.aliases:
            try:
                table.expand(f"x{key}" if key.startswith("@") else key)
            except AliasError as e:
                raise _fail(f'aliases."{key}"', str(e)) from None

    for name, patterns in config.bounce_rules.items():
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name):
            raise _fail(f'bounce_rules."{name}"', "expected a class name such as SpamBlock")
        for i, p in enumerate(patterns):
            try:
                re.compile(p)
            except re.error as e:
                raise _fail(f'bounce_rules."{name}"[{i}]', f"bad regular expression: {e}") from None

    d = config.dns
    for i, ns in enumerate(d.nameservers):
        try:
            host, _ = parse_hostport(ns, 53)
            ipaddress.ip_address(host)
        except ValueError:
            raise _fail(
                f"dns.nameservers[{i}]", f'expected an IP address (optionally :port), got "{ns}"'
            ) from None
    if d.min_ttl > d.max_ttl:
        raise _fail("dns.min_ttl", f"must be <= dns.max_ttl ({d.max_ttl:g}), got {d.min_ttl:g}")
    _positive("dns.timeout", d.timeout)

    q = config.queue
    if not q.retry_schedule:
        raise _fail("queue.retry_schedule", "needs at least one interval")
    for i, interval in enumerate(q.retry_schedule):
        _positive(f"queue.retry_schedule[{i}]", interval)
    if not 0 <= q.retry_jitter < 1:
        raise _fail("queue.retry_jitter", f"must be in [0, 1), got {q.retry_jitter}")
    _positive("queue.max_lifetime", q.max_lifetime)
    _at_least("queue.max_in_memory", q.max_in_memory, 1)
    _at_least("queue.max_resident", q.max_resident, 2)
    _at_least("queue.park_batch", q.park_batch, 1)
    _at_least("queue.recipients_per_transaction", q.recipients_per_transaction, 1)

    dl = config.delivery
    if not 1 <= dl.port <= 65535:
        raise _fail("delivery.port", f"must be 1..65535, got {dl.port}")
    _choice("delivery.tls", dl.tls, TLS_MODES)
    if dl.tls_ca_file and not os.path.isfile(dl.tls_ca_file):
        raise _fail("delivery.tls_ca_file", f"file not found: {dl.tls_ca_file}")
    if not 1 <= dl.mta_sts_port <= 65535:
        raise _fail("delivery.mta_sts_port", f"must be 1..65535, got {dl.mta_sts_port}")
    for name in (
        "connect_timeout", "greeting_timeout", "mail_timeout", "rcpt_timeout", "data_timeout",
        "data_block_timeout", "data_done_timeout", "idle_timeout",
    ):  # fmt: skip
        _positive(f"delivery.{name}", getattr(dl, name))
    _at_least("delivery.max_connections_per_site", dl.max_connections_per_site, 1)
    _at_least("delivery.messages_per_connection", dl.messages_per_connection, 1)
    _at_least("delivery.messages_per_second", dl.messages_per_second, 0)
    _at_least("delivery.backlog_per_connection", dl.backlog_per_connection, 1)
    if dl.relayhost:
        _hostport("delivery.relayhost", dl.relayhost, 25)
    if bool(dl.relay_username) != bool(dl.relay_password):
        raise _fail("delivery.relay_password", "relay_username and relay_password go together")
    if dl.relay_username and not dl.relayhost:
        raise _fail("delivery.relay_username", "set only with delivery.relayhost")
    if dl.source_address:
        _ip("delivery.source_address", dl.source_address)
    _host_name("delivery.helo_name", dl.helo_name)

    for name, pol in config.domain.items():
        k = f'domain."{name}"'
        if not name.strip(".") or any(c.isspace() or c in "@" for c in name):
            raise _fail(k, "expected a domain name")
        if pol.max_connections is not None:
            _at_least(f"{k}.max_connections", pol.max_connections, 1)
        if pol.messages_per_connection is not None:
            _at_least(f"{k}.messages_per_connection", pol.messages_per_connection, 1)
        if pol.messages_per_second is not None:
            _at_least(f"{k}.messages_per_second", pol.messages_per_second, 0)
        if pol.backlog_per_connection is not None:
            _at_least(f"{k}.backlog_per_connection", pol.backlog_per_connection, 1)
        if pol.recipients_per_transaction is not None:
            _at_least(f"{k}.recipients_per_transaction", pol.recipients_per_transaction, 1)
        if pol.tls is not None:
            _choice(f"{k}.tls", pol.tls, TLS_MODES)
        if pol.route is not None:
            _hostport(f"{k}.route", pol.route, 25)

    seen_sources: set[str] = set()
    for i, src in enumerate(config.egress):
        k = f"egress[{i}]"
        if not src.address:
            raise _fail(f"{k}.address", "each [[egress]] needs the local IP address to send from")
        _ip(f"{k}.address", src.address)
        if src.address in seen_sources:
            raise _fail(f"{k}.address", f"{src.address} is listed twice")
        seen_sources.add(src.address)
        _at_least(f"{k}.weight", src.weight, 1)
        _host_name(f"{k}.helo_name", src.helo_name)
    for name, pol in config.domain.items():
        for address in pol.egress or ():
            if address not in seen_sources:
                raise _fail(f'domain."{name}".egress', f"{address} is not an [[egress]] address")
        if pol.egress is not None and not pol.egress:
            raise _fail(f'domain."{name}".egress', "name at least one [[egress]] address")
    if config.egress and dl.source_address:
        raise _fail("delivery.source_address", "give either it or [[egress]] sources, not both")

    seen_dkim: set[str] = set()
    for i, dk in enumerate(config.dkim):
        k = f"dkim[{i}]"
        if not DNS_NAME.fullmatch(dk.domain.rstrip(".")):
            raise _fail(
                f"{k}.domain", f'expected a domain name like "example.com", got "{dk.domain}"'
            )
        if dk.domain.lower().rstrip(".") in seen_dkim:
            raise _fail(f"{k}.domain", f"{dk.domain} has a signing key already")
        seen_dkim.add(dk.domain.lower().rstrip("."))
        if not DNS_NAME.fullmatch(dk.selector):
            raise _fail(f"{k}.selector", f'expected a DNS label like "s2026", got "{dk.selector}"')
        if not dk.key_file:
            raise _fail(f"{k}.key_file", "the PEM private key to sign with")
        if not os.path.isfile(dk.key_file):
            raise _fail(f"{k}.key_file", f"file not found: {dk.key_file}")
        head, _, body = dk.canonicalization.partition("/")
        if head not in ("relaxed", "simple") or body not in ("relaxed", "simple", ""):
            raise _fail(
                f"{k}.canonicalization",
                f'expected "relaxed/relaxed", "relaxed/simple", "simple/relaxed" or '
                f'"simple/simple", got "{dk.canonicalization}"',
            )
        if "from" not in (h.lower() for h in dk.headers):
            raise _fail(f"{k}.headers", 'must include "from" (RFC 6376 5.4)')


def check_dkim_keys(config: Config) -> None:
    """Read the ``[[dkim]]`` keys (validate() only checks that the files exist: other commands
    load the config without reading keys). Raises ConfigError naming the entry."""
    from fastmta.dkim import Signers  # noqa: PLC0415

    try:
        Signers.from_config(config.dkim)
    except ValueError as e:
        raise ConfigError(f"config error: {e}") from None


def check_files(config: Config) -> None:
    """Read every file a worker needs at start: the [[dkim]] keys, policy.users_file, the [tls]
    certificate and key. ``serve`` (at start and on SIGHUP) and ``config --check`` call it, so a
    file a worker cannot use is a ConfigError naming the key, not a worker failing to start.
    validate() does not: ``send``, ``queue`` and ``passwd`` load the config too, may run as
    another user, and ``passwd`` creates the users file."""
    check_dkim_keys(config)
    path = config.policy.users_file
    if path:
        from fastmta.auth import Users, UsersFileError  # noqa: PLC0415

        try:
            Users(path)
        except UsersFileError as e:
            raise _fail("policy.users_file", str(e)) from None
        except (OSError, UnicodeDecodeError) as e:
            why = getattr(e, "strerror", None) or e
            raise _fail("policy.users_file", f"cannot read {path}: {why}") from None
    t = config.tls
    if t.cert_file and t.key_file:
        from fastmta.tls import server_context  # noqa: PLC0415

        try:
            server_context(t.cert_file, t.key_file)
        except OSError as e:  # ssl.SSLError too: "[SSL] PEM lib", a key that does not match
            raise _fail(
                "tls.cert_file",
                f"cannot load {t.cert_file} with key {t.key_file}: {e}",
            ) from None
