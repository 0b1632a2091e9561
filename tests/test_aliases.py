"""[aliases]: recipients rewritten before queueing (Postfix virtual_alias_maps / aliases(5)).

The table (lookup order, +detail, recursion, loops, limits, ORCPT), its config checks, and the
whole path: smtplib -> `fastmta serve` -> a local Maildir and a remote sink, a DSN that names
the alias, `fastmta send` and the Python API.
"""

from __future__ import annotations

import asyncio
import os
import smtplib
import subprocess

import pytest
from e2e_harness import REPO, ServerProcess, child_env, fastmta_command, send_on, until

from fastmta.aliases import AliasError, Aliases, xtext
from fastmta.api import MTA
from fastmta.config import ConfigError, load_config
from fastmta.spool.records import Recipient
from fastmta.testing.sink import Sink

LOCAL = {"example.test"}


def table(entries: dict, **kw) -> Aliases:
    return Aliases(entries, is_local=lambda d: d in LOCAL, **kw)


# --------------------------------------------------------------------------- lookup and expand


def test_lookup_order_and_forms():
    a = table({
        "sales+eu@example.test": "eu@example.test",
        "sales@example.test": "bob@example.test",
        "info": ["carol@example.test"],
        "@other.test": "catch@example.test",
        "exact@other.test": "x@y.test",
    })  # fmt: skip
    assert a.lookup("Sales+EU@Example.Test") == ("eu@example.test",)  # as given, first
    assert a.lookup("sales@example.test") == ("bob@example.test",)
    assert a.lookup("sales+Us@example.test") == ("bob+Us@example.test",)  # detail carried on
    assert a.lookup("info@example.test") == ("carol@example.test",)  # bare user: local domains
    assert a.lookup("info+x@example.test") == ("carol+x@example.test",)
    assert a.lookup("info@remote.test") is None  # ... only
    assert a.lookup("exact@other.test") == ("x@y.test",)  # an entry of its own wins
    assert a.lookup("anyone@other.test") == ("catch@example.test",)  # the domain catch-all
    assert a.lookup("nobody@example.test") is None


def test_detail_off_and_other_delimiter():
    assert (
        table({"u@example.test": "t@example.test"}, delimiter="").lookup("u+x@example.test") is None
    )
    a = table({"u@example.test": ["t@example.test", "v-keep@example.test"]}, delimiter="-")
    assert a.lookup("u-x@example.test") == ("t-x@example.test", "v-keep@example.test")


def test_expand_recursion_copies_loops_and_duplicates():
    a = table({
        "team@example.test": ["alice@example.test", "ops@example.test", "bob@remote.test"],
        "ops@example.test": ["carol@example.test", "Bob@Remote.test"],
        "alice@example.test": ["alice@example.test", "archive@backup.test"],  # keep a copy
        "ping@example.test": "pong@example.test",
        "pong@example.test": "ping@example.test",  # a loop
    })  # fmt: skip
    assert a.expand("team@example.test") == [
        "alice@example.test",
        "archive@backup.test",
        "carol@example.test",
        "Bob@Remote.test",  # bob@remote.test once: case-insensitive
    ]
    assert a.expand("ping@example.test") == ["ping@example.test"]  # ends, does not spin
    assert a.expand("plain@remote.test") == ["plain@remote.test"]


def test_expansion_limit():
    a = table({"list@example.test": [f"u{i}@remote.test" for i in range(5)]}, max_expansion=4)
    with pytest.raises(AliasError) as e:
        a.expand("list@example.test")
    assert e.value.reply[:2] == (451, "4.3.5") and "list@example.test" in e.value.reply[2]
    assert len(table({"list@example.test": ["a@x.test"] * 5}, max_expansion=1).expand(
        "list@example.test"
    )) == 1  # fmt: skip


def test_recipients_carry_orcpt_and_notify():
    a = table({"sales@example.test": ["a@example.test", "b+1@remote.test"]})
    got = a.recipients([
        Recipient("sales@example.test", notify="FAILURE"),
        Recipient("a@example.test"),  # also reached through sales: kept once
        Recipient("x@remote.test", orcpt="rfc822;orig@remote.test"),
        Recipient("X@remote.test"),
    ])  # fmt: skip
    assert [(r.address, r.notify, r.orcpt) for r in got] == [
        ("a@example.test", "FAILURE", "rfc822;sales@example.test"),
        ("b+1@remote.test", "FAILURE", "rfc822;sales@example.test"),
        ("x@remote.test", None, "rfc822;orig@remote.test"),
    ]
    assert xtext("a+b=c d@é.test") == "a+2Bb+3Dc+20d@+C3+A9.test"
    # an empty table still removes duplicates
    assert [r.address for r in Aliases({}).recipients([Recipient("a@b"), Recipient("A@B")])] == [
        "a@b"
    ]


# --------------------------------------------------------------------------- config


def write(tmp_path, text: str) -> str:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "text, key, says",
    [
        ('[aliases]\n"a b@x.test" = "c@d.test"', 'aliases."a b@x.test"', "expected a key"),
        ('[aliases]\n"a@x.test" = []', 'aliases."a@x.test"', "non-empty list"),
        ('[aliases]\n"a@x.test" = "nodomain"', 'aliases."a@x.test"', "'nodomain'"),
        ('[aliases]\n"a@x.test" = 5', 'aliases."a@x.test"', "non-empty list"),
        ('[aliases]\n"A@x.test" = "c@d.test"\n"a@X.test" = "e@d.test"', 'aliases."a@X.test"',
         "twice"),
        ('[limits]\nmax_alias_expansion = 1\n[aliases]\n"l@x.test" = ["a@d.test", "b@d.test"]',
         'aliases."l@x.test"', "more than 1 addresses"),
        ('[local]\nrecipient_delimiter = "++"', "local.recipient_delimiter", "one character"),
        ('[local]\nrecipient_delimiter = "@"', "local.recipient_delimiter", "one character"),
        ("aliases = 3", "aliases", "expected a table"),
    ],
)  # fmt: skip
def test_config_errors_name_the_key(tmp_path, text, key, says):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    assert f"config error: {key}: " in str(e.value) and says in str(e.value)


def test_config_loads_strings_and_lists(tmp_path):
    c = load_config(
        write(tmp_path, '[aliases]\n"Info@X.test" = "a@b.test"\nabuse = ["c@d", "e@f"]')
    )
    assert c.aliases == {"info@x.test": ["a@b.test"], "abuse": ["c@d", "e@f"]}
    assert load_config(None).aliases == {} and load_config(None).local.recipient_delimiter == "+"


# --------------------------------------------------------------------------- end to end

MSG = b"From: s@sender.test\r\nTo: sales@example.test\r\nSubject: hi\r\n\r\nhello\r\n"
ALIASES = {
    "sales@example.test": ["alice@example.test", "bob@remote.test"],
    "ghost@example.test": "nobody@example.test",  # a local user that does not exist
}


def mailbox(srv: ServerProcess, user: str) -> list[bytes]:
    new = os.path.join(srv.maildir, "example.test", user, "new")
    if not os.path.isdir(new):
        return []
    return [open(os.path.join(new, n), "rb").read() for n in sorted(os.listdir(new))]


def test_smtp_alias_to_maildir_and_remote_and_dsn_names_it(tmp_path):
    with Sink("127.0.0.1", 0) as sink:
        over = {
            # the test client (127.0.0.1) is outside mynetworks: it may only send to local domains
            "policy": {"mynetworks": ["192.0.2.0/24"], "local_domains": ["example.test"]},
            "local": {"users": ["alice@example.test"]},
            "delivery": {"relayhost": f"[127.0.0.1]:{sink.port}"},
            "aliases": ALIASES,
        }
        with ServerProcess(tmp_path, over) as srv:
            with smtplib.SMTP(srv.host, srv.port, local_hostname="client.test", timeout=10) as c:
                c.ehlo()
                assert c.mail("s@sender.test")[0] == 250
                assert c.rcpt("sales+q3@example.test")[0] == 250  # not a mailbox: an alias
                code, text = c.rcpt("carol@example.test")
                assert (code, text[:5]) == (550, b"5.1.1")  # no alias, no such user
                code, text = c.rcpt("bob@remote.test")  # the alias's target, given directly:
                assert (code, text[:5]) == (554, b"5.7.1")  # relaying is still refused
                assert c.data(MSG)[0] == 250
                send_on(c, "s@sender.test", ["ghost@example.test"], MSG)
            # alice+q3 (the detail carried on) lands in alice's Maildir; bob+q3 goes out
            until(lambda: mailbox(srv, "alice"), 10, "alice's Maildir")
            assert b"Delivered-To: alice+q3@example.test\n" in mailbox(srv, "alice")[0]
            assert sink.wait_for(2, 10), srv.output()  # bob's copy and the DSN for ghost
            msgs = {m.sender: m for m in sink.messages}
            assert msgs["s@sender.test"].recipients == ["bob+q3@remote.test"]
            dsn = msgs[""].data
            assert msgs[""].recipients == ["s@sender.test"]
            assert b"Original-Recipient: rfc822; ghost@example.test" in dsn
            assert b"Final-Recipient: rfc822; nobody@example.test" in dsn
            assert b"Status: 5.1.1" in dsn
            assert not mailbox(srv, "nobody")


def test_send_and_api_expand_too(tmp_path):
    srv = ServerProcess(tmp_path, {"server": {"hold_delivery": True}, "aliases": ALIASES})
    done = subprocess.run(
        fastmta_command(
            "send", "--config", srv.config_path, "-f", "a@b.test", "sales@example.test"
        ),
        input=b"Subject: x\n\nbody\n",
        capture_output=True,
        cwd=REPO,
        env=child_env(),
        timeout=20,
    )
    assert done.returncode == 0, done.stderr.decode()
    with srv:  # a start adopts the injected message into a shard
        until(lambda: srv.received_records(), 10, "the message adopted")
    [(env, _)] = srv.read_spool().values()
    assert [r.address for r in env.recipients] == ["alice@example.test", "bob@remote.test"]
    assert {r.orcpt for r in env.recipients} == {"rfc822;sales@example.test"}
    srv.close()

    async def main():
        config = {"server": {"spool_dir": str(tmp_path / "api"), "hold_delivery": True},
                  "aliases": ALIASES}  # fmt: skip
        async with MTA(config, listen=False) as mta:
            qid = await mta.submit("a@b.test", ["ghost@example.test", "x@y.test"], b"x\n")
            msg = mta.worker.spool.get(qid)
            return [r.address for r in msg.envelope.recipients]

    assert asyncio.run(main()) == ["nobody@example.test", "x@y.test"]


def test_config_route_explains_addresses(tmp_path):
    """`fastmta config --check FILE --route ADDRESS`: aliases, then mailbox or next hop."""
    cfg = write(
        tmp_path,
        f"""
[policy]
local_domains = ["example.test"]
[local]
maildir_root = "{tmp_path / "md"}"
users = ["alice@example.test"]
[domain."partner.test"]
route = "[10.1.2.3]:2525"
tls = "required"
[aliases]
"sales@example.test" = ["alice@example.test", "bob@remote.test", "p@partner.test"]
""",
    )
    done = subprocess.run(
        fastmta_command("config", "--check", cfg, "--route", "Sales+X@example.test",
                        "--route", "nobody@example.test"),
        capture_output=True, cwd=REPO, env=child_env(), timeout=20,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()
    lines = done.stdout.decode().splitlines()
    assert lines == [
        f"{cfg}: OK",
        "Sales+X@example.test: an alias of 3 address(es)",
        f"  -> alice+X@example.test: local Maildir {tmp_path / 'md' / 'example.test' / 'alice'}",
        "  -> bob+X@remote.test: MX hosts of remote.test, port 25, TLS opportunistic, "
        "MTA-STS policy applies",
        '  -> p+X@partner.test: [domain."partner.test"] route: host [10.1.2.3]:2525, TLS required',
        "nobody@example.test: refused at RCPT: 550 5.1.1 <nobody@example.test>: Recipient "
        "address rejected: User unknown",
    ]
    done = subprocess.run(fastmta_command("config", "--route", "a@b.test"), capture_output=True,
                          cwd=REPO, env=child_env(), timeout=20)  # fmt: skip
    assert done.returncode != 0
