"""Bounce classification (fastmta/delivery/classify.py): KumoMTA's class names from the
enhanced status code (RFC 3463), common phrases, and rules of one's own first."""

from __future__ import annotations

import pytest

from fastmta.config import ConfigError, load_config
from fastmta.delivery.classify import CLASSES, Classifier
from fastmta.protocol.replies import reply


@pytest.mark.parametrize(
    "code, enhanced, text, expected",
    [
        (550, "5.1.1", "<x@y>: Recipient address rejected: User unknown", "InvalidRecipient"),
        (550, "5.1.2", "Host or domain name not found", "BadDomain"),
        (556, "5.1.10", "Recipient address has null MX", "BadDomain"),
        (552, "5.2.2", "Mailbox full", "QuotaIssues"),
        (550, "5.2.1", "The email account that you tried to reach is disabled", "InactiveMailbox"),
        (451, "4.4.1", "Connect to mx[192.0.2.1]:25 timed out", "NoAnswerFromHost"),
        (421, "4.4.2", "Connection lost", "BadConnection"),
        (451, "4.4.3", "DNS lookup failed", "DNSFailure"),
        (550, "5.4.6", "Mail loops back to myself", "RoutingErrors"),
        (451, "4.4.7", "Delivery time expired", "MessageExpired"),
        (553, "5.6.7", "Message needs SMTPUTF8", "ProtocolErrors"),
        (550, "5.7.1", "Service unavailable; client host blocked using Spamhaus", "SpamBlock"),
        (550, "5.7.1", "Message rejected as spam", "SpamContent"),
        (550, "5.7.1", "Delivery not authorized", "PolicyRelated"),
        (550, "5.7.26", "Unauthenticated email from example.com is not accepted (DMARC)",
         "AuthenticationFailed"),
        (554, "5.7.1", "Relay access denied", "RelayDenied"),
        (550, None, "No such user here", "InvalidRecipient"),  # no enhanced code: the text
        (550, "5.5.0", "Requested action not taken: mailbox unavailable", "InvalidRecipient"),
        (450, None, "Greylisted, try again later", "TransientFailure"),
        (451, None, "Local error", "TransientFailure"),
        (421, None, "Too busy", "BadConnection"),
        (554, None, "Transaction failed", "Uncategorized"),
    ],
)  # fmt: skip
def test_builtin_classes(code, enhanced, text, expected):
    assert Classifier().classify(reply(code, enhanced, text)) == expected
    assert expected in CLASSES


def test_own_rules_come_first():
    c = Classifier({"Reputation": [r"^550 5\.7\.1 .*blocked"], "QuotaIssues": ["^452 "]})
    assert c.classify(reply(550, "5.7.1", "blocked using spamhaus")) == "Reputation"
    assert c.classify(reply(452, "4.5.3", "Too many recipients")) == "QuotaIssues"
    assert c.classify(reply(550, "5.1.1", "unknown")) == "InvalidRecipient"  # built-in still
    assert c.classify(reply(550, "5.1.1", "unknown")) == "InvalidRecipient"  # (cached)


def test_config_bounce_rules(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[bounce_rules]\nSpamBlock = ["zen\\\\.example"]\n')
    assert load_config(str(path)).bounce_rules == {"SpamBlock": ["zen\\.example"]}
    path.write_text('[bounce_rules]\nSpamBlock = ["(unclosed"]\n')
    with pytest.raises(ConfigError, match=r'bounce_rules."SpamBlock"\[0\]: bad regular'):
        load_config(str(path))
    path.write_text('[bounce_rules]\n"not a name" = ["x"]\n')
    with pytest.raises(ConfigError, match=r'bounce_rules."not a name": expected a class name'):
        load_config(str(path))
