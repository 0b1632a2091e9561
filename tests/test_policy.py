"""fastmta.policy: network membership and the relay decision matrix (never an open relay)."""

from __future__ import annotations

import itertools

import pytest

from fastmta.policy import RELAY_DENIED, Networks, RelayPolicy


@pytest.mark.parametrize(
    "ip, inside",
    [
        ("127.0.0.1", True),
        ("127.255.0.9", True),
        ("10.1.2.3", True),
        ("10.2.0.1", False),
        ("192.168.1.77", True),
        ("192.168.1.78", False),
        ("::1", True),
        ("::2", False),
        ("2001:db8::1234", True),
        ("2001:db9::1", False),
        ("::ffff:10.1.0.5", True),  # v4-mapped v6 matches the v4 network
        ("::ffff:8.8.8.8", False),
        ("[10.1.0.1]", True),
        ("fe80::1%eth0", True),
        ("8.8.8.8", False),
        ("not an ip", False),
        ("", False),
    ],
)
def test_networks_membership(ip, inside):
    nets = Networks(["127.0.0.0/8", "10.1.0.0/16", "192.168.1.77/32", "::1/128", "2001:db8::/32",
                     "fe80::/10"])  # fmt: skip
    assert (ip in nets) is inside


def test_networks_non_strict_and_mapped_cidr():
    nets = Networks(["10.1.2.3/8", "::ffff:172.16.0.0/108"])
    assert "10.200.0.1" in nets
    assert "172.16.5.5" in nets and "::ffff:172.16.5.5" in nets
    assert "172.32.0.1" not in nets
    assert 42 not in nets


def test_networks_rejects_bad_cidr():
    with pytest.raises(ValueError):
        Networks(["10.0.0.0/33"])


def test_empty_networks_contains_nothing():
    assert "127.0.0.1" not in Networks([])


@pytest.fixture
def policy():
    return RelayPolicy(["127.0.0.0/8", "::1/128", "10.0.0.0/8"], ["Example.COM", ".corp.example"])


@pytest.mark.parametrize(
    "domain, local",
    [("example.com", True), ("EXAMPLE.com", True), ("example.com.", True), ("a.example.com", False),
     ("corp.example", False), ("mail.corp.example", True), ("x.y.corp.example", True),
     ("other.org", False), ("notexample.com", False)],
)  # fmt: skip
def test_is_local(policy, domain, local):
    assert policy.is_local(domain) is local


def test_relay_matrix(policy):
    """Every combination: allowed iff local domain OR client in mynetworks OR authenticated."""
    clients = {"127.0.0.1": True, "::1": True, "10.9.9.9": True, "::ffff:10.0.0.1": True,
               "203.0.113.5": False, "2001:db8::5": False, "::ffff:203.0.113.5": False}  # fmt: skip
    domains = {
        "example.com": True,
        "mail.corp.example": True,
        "gmail.com": False,
        "EXAMPLE.org": False,
    }
    for (ip, trusted), (domain, local), auth in itertools.product(
        clients.items(), domains.items(), (False, True)
    ):
        result = policy.rcpt_allowed(ip, auth, domain)
        if local or trusted or auth:
            assert result is None, (ip, domain, auth)
        else:
            assert result == (554, "5.7.1", "Relay access denied") == RELAY_DENIED, (
                ip,
                domain,
                auth,
            )


def test_no_open_relay_with_empty_config():
    p = RelayPolicy([], [])
    assert p.rcpt_allowed("127.0.0.1", False, "gmail.com") == RELAY_DENIED
    assert p.rcpt_allowed("127.0.0.1", True, "gmail.com") is None
    assert p.rcpt_allowed("garbage", False, "gmail.com") == RELAY_DENIED


def test_postmaster_without_domain_is_accepted():
    assert RelayPolicy([], []).rcpt_allowed("203.0.113.5", False, "") is None


def test_relay_domains_open_to_anyone_and_nothing_else():
    """policy.relay_domains (Postfix relay_domains): anyone may send to them; they are not
    local; other domains stay closed to outsiders."""
    p = RelayPolicy([], ["local.test"], ["Backup.test", ".gw.test"])
    for domain in ("backup.test", "BACKUP.test.", "a.gw.test", "local.test"):
        assert p.rcpt_allowed("203.0.113.5", False, domain) is None, domain
    for domain in ("gw.test", "x.backup.test", "gmail.com"):
        assert p.rcpt_allowed("203.0.113.5", False, domain) == RELAY_DENIED, domain
    assert not p.is_local("backup.test") and p.is_local("LOCAL.test")


def test_relay_recipients_list_the_valid_addresses_of_a_relay_domain():
    """policy.relay_recipients (Postfix relay_recipient_maps): a relay domain with entries
    takes only those; "@domain" takes all of it; other domains are not concerned."""
    p = RelayPolicy([], [], ["listed.test", "open.test", "all.test"],
                    ["Bob@Listed.test", "@all.test"])  # fmt: skip
    assert p.relay_recipient_check("bob@LISTED.test", "LISTED.test") is None
    assert p.relay_recipient_check("eve@listed.test", "listed.test") == (
        550, "5.1.1",
        "<eve@listed.test>: Recipient address rejected: User unknown in relay recipient table",
    )  # fmt: skip
    assert p.relay_recipient_check("any@open.test", "open.test") is None  # no list: all
    assert p.relay_recipient_check("any@all.test", "all.test") is None
    assert p.relay_recipient_check("x@other.test", "other.test") is None
    assert RelayPolicy([], []).relay_recipient_check("x@y.test", "y.test") is None
