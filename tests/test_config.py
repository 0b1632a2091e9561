"""fastmta.config: TOML loading, validation messages, durations/sizes, host:port, the example file.
Also fastmta.log (setup_logging, DeliveryLog), which has no test file of its own."""

from __future__ import annotations

import asyncio
import logging
import re
import tomllib

import msgspec
import pytest

from fastmta import config as cfg
from fastmta.config import (
    Config,
    ConfigError,
    dump_example,
    load_config,
    parse_duration,
    parse_hostport,
    parse_size,
    resolve,
)
from fastmta.log import DeliveryLog, DeliveryRecord, setup_logging


def load_text(tmp_path, text: str) -> Config:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return load_config(str(path))


def error_of(tmp_path, text: str) -> str:
    with pytest.raises(ConfigError) as exc:
        load_text(tmp_path, text)
    return str(exc.value)


# --------------------------------------------------------------------------- durations, sizes


@pytest.mark.parametrize(
    "value, seconds",
    [
        (30, 30.0),
        (1.5, 1.5),
        ("30", 30.0),
        ("30s", 30.0),
        ("5m", 300.0),
        ("2h", 7200.0),
        ("5d", 432000.0),
        ("1h30m", 5400.0),
        ("1d2h3m4s", 93784.0),
        ("250ms", 0.25),
        (" 2H ", 7200.0),
        (0, 0.0),
    ],
)
def test_parse_duration(value, seconds):
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["", "s", "5x", "m5", "1h 30m", "-5", -1, True, "5m5", None])
def test_parse_duration_rejects(value):
    with pytest.raises(ValueError):
        parse_duration(value)


@pytest.mark.parametrize(
    "value, size",
    [(1000, 1000), ("1000", 1000), ("10k", 10240), ("50M", 50 << 20), ("1G", 1 << 30),
     ("50MiB", 50 << 20), ("2m", 2 << 20), ("1.5k", 1536)],
)  # fmt: skip
def test_parse_size(value, size):
    assert parse_size(value) == size


@pytest.mark.parametrize("value", ["", "M", "5X", "five", -1, True, 1.5])
def test_parse_size_rejects(value):
    with pytest.raises(ValueError):
        parse_size(value)


# --------------------------------------------------------------------------- host:port


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[::1]:25", ("::1", 25)),
        ("[10.0.0.1]:2525", ("10.0.0.1", 2525)),
        ("host:25", ("host", 25)),
        ("host", ("host", 587)),
        ("[mx.example.com]", ("mx.example.com", 587)),
        ("::1", ("::1", 587)),
        ("127.0.0.1:2525", ("127.0.0.1", 2525)),
    ],
)
def test_parse_hostport(text, expected):
    assert parse_hostport(text, 587) == expected


@pytest.mark.parametrize(
    "text", ["", ":25", "host:", "host:0", "host:65536", "[::1", "[::1]x", "h:p"]
)
def test_parse_hostport_rejects(text):
    with pytest.raises(ValueError):
        parse_hostport(text, 25)


# --------------------------------------------------------------------------- defaults, resolution


def test_defaults_are_usable(monkeypatch, tmp_path):
    monkeypatch.delenv("FASTMTA_SPOOL", raising=False)
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    c = load_config(None)
    assert c.server.hostname  # getfqdn
    assert c.server.workers >= 1
    assert c.server.spool_dir == str(tmp_path / "fastmta-spool")
    assert c.server.delivery_log == str(tmp_path / "fastmta-spool" / "delivery.log")
    assert c.local.maildir_root == str(tmp_path / "maildir")
    assert c.delivery.helo_name == c.server.hostname
    assert [(li.host, li.port, li.role, li.tls) for li in c.listeners] == [
        ("127.0.0.1", 2525, "relay", "none")
    ]
    assert c.limits.max_message_size == 50 << 20
    assert c.limits.command_timeout == 300
    assert c.queue.retry_schedule == [300, 600, 1200, 2400, 4800, 9600, 14400]
    assert c.queue.max_lifetime == 5 * 86400
    assert c.policy.mynetworks == ["127.0.0.0/8", "::1/128"]


def test_spool_dir_from_environment(tmp_path):
    env = {"FASTMTA_SPOOL": str(tmp_path / "a"), "XDG_STATE_HOME": str(tmp_path / "x")}
    assert resolve(Config(), env).server.spool_dir == str(tmp_path / "a")
    env = {"XDG_STATE_HOME": str(tmp_path / "x")}
    assert resolve(Config(), env).server.spool_dir == str(tmp_path / "x" / "fastmta" / "spool")


def test_values_from_file(tmp_path):
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("x")
    key.write_text("x")
    c = load_text(
        tmp_path,
        f"""
[server]
hostname = "mx.example.org"
workers = 3
spool_dir = "{tmp_path}/spool"
[[listener]]
address = "[::1]:2525"
[[listener]]
address = "0.0.0.0:587"
role = "submission"
auth = "tls"
[tls]
cert_file = "{cert}"
key_file = "{key}"
[limits]
max_message_size = "10M"
command_timeout = "1m"
[policy]
users_file = "{tmp_path}/users"
[queue]
retry_schedule = ["1m", 90, "1h30m"]
[delivery]
relayhost = "[smtp.example.net]:587"
relay_username = "u"
relay_password = "p"
[domain."Gmail.COM"]
max_connections = 5
route = "[10.1.2.3]:2525"
""",
    )
    assert c.server.workers == 3
    assert c.delivery.helo_name == "mx.example.org"
    assert [(li.host, li.port, li.role, li.tls) for li in c.listeners] == [
        ("::1", 2525, "relay", "starttls"),
        ("0.0.0.0", 587, "submission", "starttls"),
    ]
    assert c.limits.max_message_size == 10 << 20
    assert c.limits.command_timeout == 60
    assert c.queue.retry_schedule == [60, 90, 5400]
    assert c.domain["gmail.com"].max_connections == 5
    assert c.domain["gmail.com"].messages_per_second is None  # inherit
    assert c.local.maildir_root == str(tmp_path / "maildir")


def test_overrides_are_validated_like_the_file(tmp_path):
    c = load_config(
        None, {"server": {"spool_dir": str(tmp_path)}, "listener": [{"address": "[::1]:25"}]}
    )
    assert c.server.spool_dir == str(tmp_path)
    assert c.listeners[0].port == 25
    with pytest.raises(ConfigError, match=r"^config error: listener\[0\]\.address: "):
        load_config(None, {"listener": [{"address": "nope:99999"}]})


# --------------------------------------------------------------------------- error messages


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "[limits]\nmax_recipients = 10",
            "config error: limits.max_recipients: must be >= 100 (RFC 5321 4.5.3.1.8), got 10",
        ),
        (
            '[[listener]]\n[[listener]]\naddress = "127.0.0.1:1"\nrole = "mx"',
            'config error: listener[1].role: expected "relay" or "submission", got "mx"',
        ),
        ("[limits]\nmax_recipientz = 1000", "config error: limits.max_recipientz: unknown key"),
        ("[limitz]\nmax_recipients = 1000", "config error: limitz: unknown key"),
        (
            '[server]\ncommit_delay = "1s"',
            "config error: server.commit_delay: must be between 0 and 100ms, got 1s",
        ),
        ('[[listener]]\nadress = "x"', "config error: listener[0].adress: unknown key"),
        (
            '[limits]\nmax_recipients = "many"',
            "config error: limits.max_recipients: expected int, got str",
        ),
        (
            '[queue]\nretry_schedule = ["5m", "soon"]',
            "config error: queue.retry_schedule[1]: expected a duration",
        ),
        (
            '[limits]\nmax_message_size = "huge"',
            "config error: limits.max_message_size: expected a size",
        ),
        (
            "[limits]\nmax_message_size = 1000",
            "config error: limits.max_message_size: must be >= 65536",
        ),
        (
            "[limits]\nmax_line_length = 998",
            "config error: limits.max_line_length: must be >= 1000 (RFC 5321 4.5.3.1.6)",
        ),
        (
            "[limits]\nmax_command_line = 100",
            "config error: limits.max_command_line: must be >= 512 (RFC 5321 4.5.3.1.4)",
        ),
        ("[limits]\ncommand_timeout = 0", "config error: limits.command_timeout: must be > 0"),
        (
            '[[listener]]\ntls = "starttls"',
            'config error: listener[0].tls: "starttls" needs [tls] cert_file',
        ),
        (
            '[[listener]]\nauth = "sometimes"',
            'config error: listener[0].auth: expected "tls", "always", "never"',
        ),
        (
            '[[listener]]\nbare_newline = "ok"',
            'config error: listener[0].bare_newline: expected "reject" or "normalize"',
        ),
        (
            '[[listener]]\nrole = "submission"',
            "config error: listener[0].auth: a submission listener needs AUTH",
        ),
        (
            '[[listener]]\naddress = "localhost:99999"',
            "config error: listener[0].address: port must be 1..65535",
        ),
        (
            "[[listener]]\n[[listener]]",
            'config error: listener[1].address: "127.0.0.1:2525" is listed twice',
        ),
        (
            '[tls]\ncert_file = "/nonexistent.pem"',
            "config error: tls.key_file: cert_file and key_file go together",
        ),
        (
            '[tls]\ncert_file = "/nonexistent.pem"\nkey_file = "/nonexistent.key"',
            "config error: tls.cert_file: file not found",
        ),
        (
            '[policy]\nmynetworks = ["10.0.0.0/8", "10.0.0.0/33"]',
            "config error: policy.mynetworks[1]: expected a CIDR",
        ),
        (
            '[policy]\nlocal_domains = ["a b"]',
            "config error: policy.local_domains[0]: expected a domain name",
        ),
        (
            '[policy]\nrelay_domains = ["a.test"]\nrelay_recipients = ["u@b.test"]',
            'config error: policy.relay_recipients[0]: "b.test" is not in policy.relay_domains',
        ),
        (
            '[policy]\nrelay_domains = ["a.test"]\nrelay_recipients = ["nobody"]',
            "config error: policy.relay_recipients[0]: expected",
        ),
        (
            '[policy]\nrelay_domains = ["a b"]',
            "config error: policy.relay_domains[0]: expected a domain name",
        ),
        (
            '[policy]\nlocal_domains = ["a.test"]\nrelay_domains = ["A.test."]',
            'config error: policy.relay_domains[0]: "A.test." is in policy.local_domains too',
        ),
        ('[local]\nusers = ["alice"]', 'config error: local.users[0]: expected "user@domain"'),
        (
            '[dns]\nnameservers = ["dns.google"]',
            "config error: dns.nameservers[0]: expected an IP address",
        ),
        ("[dns]\nmin_ttl = 100\nmax_ttl = 10", "config error: dns.min_ttl: must be <= dns.max_ttl"),
        (
            "[queue]\nretry_schedule = []",
            "config error: queue.retry_schedule: needs at least one interval",
        ),
        ("[queue]\nretry_jitter = 1.5", "config error: queue.retry_jitter: must be in [0, 1)"),
        (
            '[delivery]\ntls = "maybe"',
            'config error: delivery.tls: expected "opportunistic", "none", "required", "verify", got "maybe"',
        ),
        ("[delivery]\nport = 0", "config error: delivery.port: must be 1..65535"),
        (
            '[delivery]\nrelay_username = "u"',
            "config error: delivery.relay_password: relay_username and relay_password go together",
        ),
        (
            '[delivery]\nsource_address = "eth0"',
            "config error: delivery.source_address: expected an IP address",
        ),
        (
            "[delivery]\nmail_timeout = -1",
            "config error: delivery.mail_timeout: a duration must be >= 0",
        ),
        (
            '[domain."a.com"]\nmax_connectionz = 1',
            'config error: domain."a.com".max_connectionz: unknown key',
        ),
        (
            "[delivery]\nbacklog_per_connection = 0",
            "config error: delivery.backlog_per_connection: must be >= 1, got 0",
        ),
        (
            '[domain."a.com"]\nbacklog_per_connection = 0',
            'config error: domain."a.com".backlog_per_connection: must be >= 1, got 0',
        ),
        (
            '[domain."a.com"]\nmax_connections = 0',
            'config error: domain."a.com".max_connections: must be >= 1, got 0',
        ),
        (
            '[domain."a.com"]\ntls = "yes"',
            'config error: domain."a.com".tls: expected "opportunistic"',
        ),
        (
            '[domain."a.com"]\nroute = "[10.0.0.1]:0"',
            'config error: domain."a.com".route: port must be 1..65535',
        ),
        ('[server]\nlog_level = "loud"', 'config error: server.log_level: expected "debug"'),
        ("server = 3", "config error: server: expected a table, got int"),
    ],
)
def test_error_names_the_key(tmp_path, text, message):
    assert error_of(tmp_path, text).startswith(message)


def test_invalid_toml_names_the_file(tmp_path):
    assert re.match(r"config error: .*c\.toml: invalid TOML: ", error_of(tmp_path, "[server\n"))


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_config(str(tmp_path / "absent.toml"))


# --------------------------------------------------------------------------- the example file


def test_example_parses_and_equals_defaults():
    text = dump_example()
    assert msgspec.convert(tomllib.loads(text), Config, dec_hook=cfg._dec_hook) is not None
    assert load_config(cfg.resources.files("fastmta") / "fastmta.example.toml") == load_config(None)


def _example_sections(text: str) -> dict[str, set[str]]:
    """Section name -> keys written in it, commented out or not ("# key = value" counts)."""
    sections: dict[str, set[str]] = {}
    current = ""
    for line in text.splitlines():
        body = line.lstrip("# ").rstrip()
        m = re.fullmatch(r"\[\[?([A-Za-z_]+)(?:\.\"[^\"]*\")?\]\]?", body)
        if m:
            current = m.group(1)
            sections.setdefault(current, set())
            continue
        m = re.fullmatch(r"([a-z_0-9]+) = .+", body)
        if m and current:
            sections[current].add(m.group(1))
    return sections


def test_example_documents_every_field():
    sections = _example_sections(dump_example())
    for name, struct in cfg.SECTIONS.items():
        assert name in sections, f"section [{name}] missing from the example"
        missing = set(struct.__struct_fields__) - sections[name]
        assert not missing, f"[{name}] keys missing from the example: {sorted(missing)}"
    # no section forgotten; [aliases] is free-form (its keys are addresses)
    assert set(Config.__struct_fields__) == set(cfg.SECTIONS) | {"aliases", "bounce_rules"}
    assert "aliases" in sections and "bounce_rules" in sections


def test_every_key_is_commented():
    """Each key line in the example is preceded by a comment line (directly or in its group)."""
    lines = dump_example().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"[a-z_]+ = ", line):
            j = i - 1
            while j >= 0 and re.match(r"[a-z_]+ = ", lines[j]):
                j -= 1
            assert lines[j].startswith("#"), f"no comment above {line!r}"


def test_local_users_by_domain(tmp_path):
    c = load_text(tmp_path, '[local]\nusers = ["Alice@Example.com", "bob@example.com", "x@b.org"]')
    assert c.local.users_by_domain() == {"example.com": {"alice", "bob"}, "b.org": {"x"}}


# --------------------------------------------------------------------------- fastmta.log


def test_delivery_log_writes_json_lines(tmp_path):
    path = tmp_path / "logs" / "delivery.log"
    log = DeliveryLog(str(path))
    log.write(DeliveryRecord(queue_id="q1", recipient="a@b.c", outcome="delivered", code=250,
                             enhanced="2.0.0", text="ok", tls=True, latency=0.01))  # fmt: skip
    log.write(
        DeliveryRecord(queue_id="q1", recipient="d@b.c", outcome="deferred", code=451, attempt=2)
    )
    log.close()
    records = [
        msgspec.json.decode(line, type=DeliveryRecord) for line in path.read_bytes().splitlines()
    ]
    assert [(r.recipient, r.outcome, r.code, r.attempt) for r in records] == [
        ("a@b.c", "delivered", 250, 1),
        ("d@b.c", "deferred", 451, 2),
    ]
    assert records[0].tls is True and records[0].time > 0
    with pytest.raises(ValueError):
        log.write(records[0])


def test_delivery_log_buffers_then_flushes_within_interval(tmp_path):
    path = tmp_path / "delivery.log"

    async def run():
        log = DeliveryLog(str(path), flush_interval=0.05)
        log.write(DeliveryRecord(queue_id="q", recipient="a@b.c", outcome="bounced"))
        assert path.read_bytes() == b""  # buffered, not yet written
        await asyncio.sleep(0.2)
        assert path.read_bytes().count(b"\n") == 1  # the timer flushed it
        log.write(DeliveryRecord(queue_id="q", recipient="b@b.c", outcome="expired"))
        log.close()  # close flushes
        assert path.read_bytes().count(b"\n") == 2

    asyncio.run(run())


def test_delivery_log_follows_logrotate(tmp_path):
    """Rotation by rename (logrotate's default "create") or removal: the next write goes to a
    new file at the configured path, no signal needed."""
    path = tmp_path / "delivery.log"

    def queue_ids(p):
        return [msgspec.json.decode(x)["queue_id"] for x in p.read_bytes().splitlines()]

    log = DeliveryLog(str(path))
    log.write(DeliveryRecord(queue_id="q1", recipient="a@b.c", outcome="delivered"))
    log.flush()
    path.rename(tmp_path / "delivery.log.1")
    log.write(DeliveryRecord(queue_id="q2", recipient="a@b.c", outcome="delivered"))
    log.flush()
    assert queue_ids(tmp_path / "delivery.log.1") == ["q1"]
    assert queue_ids(path) == ["q2"]  # a new file, not the rotated one
    path.unlink()
    log.write(DeliveryRecord(queue_id="q3", recipient="a@b.c", outcome="delivered"))
    log.close()
    assert queue_ids(path) == ["q3"]


def test_setup_logging_to_file(tmp_path):
    path = tmp_path / "fastmta.log"
    root = logging.getLogger()
    old_level, old_handlers = root.level, list(root.handlers)
    try:
        setup_logging("warning", str(path))
        logging.getLogger("fastmta.test").info("hidden")
        logging.getLogger("fastmta.test").warning("shown %d", 42)
        handler = setup_logging("debug", str(path))  # replaces, does not duplicate
        logging.getLogger("fastmta.test").debug("again")
        handler.flush()
        text = path.read_text()
        assert "hidden" not in text
        assert re.search(
            r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3} WARNING fastmta\.test\[\d+\]: shown 42$",
            text,
            re.M,
        )
        assert text.count("again") == 1
        with pytest.raises(ValueError):
            setup_logging("loud")
    finally:
        from fastmta import log as fmlog

        if fmlog._handler is not None:
            root.removeHandler(fmlog._handler)
            fmlog._handler.close()
            fmlog._handler = None
        root.setLevel(old_level)
        assert root.handlers == old_handlers
