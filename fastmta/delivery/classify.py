"""Bounce classification: a failed attempt's reply, reduced to one of a small set of classes
that tell a sender what to do about it (drop the address, fix the setup, slow down, wait).

The class names are KumoMTA's (its bounce classifier), so logs and tools that know one know
the other. The built-in rules read the enhanced status code (RFC 3463, the IANA registry of
SMTP enhanced status codes), then a few phrases common in replies without a useful code.
``[bounce_rules]`` in the config adds rules of one's own, tried first: a class name and the
regular expressions (case-insensitive, searched in ``"<code> <enhanced> <text>"``) that mean it.

    Classifier({"SpamBlock": ["spamhaus", "blocklist"]}).classify(reply(550, "5.7.1", "..."))
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from fastmta.protocol.replies import Reply

__all__ = ["CLASSES", "Classifier"]

CLASSES = (
    "InvalidRecipient", "BadDomain", "InactiveMailbox", "InvalidSender", "QuotaIssues",
    "NoAnswerFromHost", "BadConnection", "DNSFailure", "RoutingErrors", "TransientFailure",
    "MessageExpired", "ProtocolErrors", "AuthenticationFailed", "PolicyRelated",
    "TooManyRecipients", "SpamBlock", "SpamContent", "VirusRelated", "ContentRelated",
    "RelayDenied", "BadConfiguration", "Uncategorized",
)  # fmt: skip

# (subject, detail) of the enhanced code -> class; detail None = any detail of the subject.
_BY_CODE: dict[tuple[int, int | None], str] = {
    (1, 1): "InvalidRecipient",  # bad destination mailbox address
    (1, 2): "BadDomain",  # bad destination system address
    (1, 3): "InvalidRecipient",  # bad destination mailbox address syntax
    (1, 4): "InvalidRecipient",  # destination mailbox address ambiguous
    (1, 6): "InactiveMailbox",  # destination mailbox has moved
    (1, 7): "InvalidSender",  # bad sender's mailbox address syntax
    (1, 8): "InvalidSender",  # bad sender's system address
    (1, 10): "BadDomain",  # null MX (RFC 7505)
    (2, 1): "InactiveMailbox",  # mailbox disabled
    (2, 2): "QuotaIssues",  # mailbox full
    (2, 3): "QuotaIssues",  # message length exceeds administrative limit
    (2, 4): "InvalidRecipient",  # mailing list expansion problem
    (3, 1): "QuotaIssues",  # mail system full
    (3, 4): "QuotaIssues",  # message too big for system
    (3, 5): "BadConfiguration",  # system incorrectly configured
    (4, 1): "NoAnswerFromHost",  # no answer from host
    (4, 2): "BadConnection",  # bad connection
    (4, 3): "DNSFailure",  # directory server failure
    (4, 4): "RoutingErrors",  # unable to route
    (4, 5): "TransientFailure",  # mail system congestion
    (4, 6): "RoutingErrors",  # routing loop detected
    (4, 7): "MessageExpired",  # delivery time expired
    (5, 3): "TooManyRecipients",  # too many recipients
    (5, None): "ProtocolErrors",  # protocol errors
    (6, None): "ProtocolErrors",  # content negotiation (SMTPUTF8, 8BITMIME, conversions)
    (7, 1): "PolicyRelated",  # delivery not authorized, message refused
    (7, 13): "InactiveMailbox",  # user account disabled
    (7, 17): "InvalidRecipient",  # mailbox owner has changed
    (7, 18): "BadDomain",  # domain owner has changed
    (7, 27): "InvalidSender",  # sender address has null MX
    (7, 38): "PolicyRelated",  # mail flood detected
    (7, None): "AuthenticationFailed",  # the other security and policy statuses (SPF, DKIM...)
}

# Phrases that decide before the code does (a 5.7.1 may be a blocklisting or spam content),
# and that classify replies without an enhanced code.
_PHRASES: tuple[tuple[str, str], ...] = (
    ("SpamBlock", r"spamhaus|spamcop|barracuda|block ?list|black ?list|\bdnsbl\b|\brbl\b|"
                  r"listed (?:at|on|in)|poor reputation|ip reputation"),
    ("SpamContent", r"\bspam\b|unsolicited|junk mail"),
    ("VirusRelated", r"virus|malware|infected"),
    ("RelayDenied", r"relay(?:ing)? (?:access )?(?:denied|not permitted|not allowed)"),
    ("QuotaIssues", r"mailbox (?:is )?full|over ?quota|quota exceeded|insufficient storage"),
    ("InactiveMailbox", r"mailbox (?:is )?(?:disabled|inactive)|account (?:is )?disabled"),
    ("InvalidRecipient", r"user unknown|unknown user|no such (?:user|mailbox|recipient)|"
                         r"does not exist|mailbox unavailable|invalid recipient|"
                         r"recipient (?:address )?rejected"),
    ("TransientFailure", r"try again later|temporarily|greylist|too many connections"),
)  # fmt: skip
_PHRASE_RE = [(name, re.compile(p, re.IGNORECASE)) for name, p in _PHRASES]


class Classifier:
    """Classifies replies; ``rules`` (class -> regexes) are tried before the built-in ones."""

    def __init__(self, rules: Mapping[str, Sequence[str]] | None = None) -> None:
        self._rules = [
            (name, re.compile(p, re.IGNORECASE)) for name, ps in (rules or {}).items() for p in ps
        ]
        self._cache: dict[tuple[int, str | None, str], str] = {}

    def classify(self, r: Reply) -> str:
        """The class of a failure reply (``Uncategorized`` when nothing matches)."""
        key = (r.code, r.enhanced, r.text)
        found = self._cache.get(key)
        if found is None:
            found = self._classify(r)
            if len(self._cache) < 4096:  # bounded: reply texts are remote input
                self._cache[key] = found
        return found

    def _classify(self, r: Reply) -> str:
        line = f"{r.code} {r.enhanced or ''} {r.text}"
        for name, rx in self._rules:
            if rx.search(line):
                return name
        by_code = _code_class(r.enhanced)
        # a remote text says more than a generic code (5.7.1, 5.0.0, none at all)
        if by_code in (None, "PolicyRelated", "AuthenticationFailed", "ProtocolErrors"):
            for name, rx in _PHRASE_RE:
                if rx.search(r.text):
                    return name
        if by_code is not None:
            return by_code
        if r.code == 421:
            return "BadConnection"
        return "TransientFailure" if 400 <= r.code < 500 else "Uncategorized"


def _code_class(enhanced: str | None) -> str | None:
    if not enhanced:
        return None
    parts = enhanced.split(".")
    if len(parts) != 3 or not (parts[1].isdigit() and parts[2].isdigit()):
        return None
    subject, detail = int(parts[1]), int(parts[2])
    return _BY_CODE.get((subject, detail)) or _BY_CODE.get((subject, None))
