"""Which queued messages an operator command acts on (``fastmta queue ... --domain/--sender``).

A :class:`Selection` is queue ids, ``--all``, recipient domains and senders; every criterion
given must hold (ids AND domains AND senders). Pure: no I/O. The control socket's workers, the
stopped-spool path of ``fastmta queue`` and the parked files all ask the same
:meth:`Selection.matches`, so a command selects the same messages whether the server runs or
not, and wherever a message is kept.

Commands act on whole messages (hold, release, delete, flush), like Postfix's postsuper; only
``bounce`` acts on recipients: with ``--domain``, just the recipients at those domains are
bounced and the others stay queued (:meth:`Selection.recipients`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from fastmta.queue.scheduler import domain_of as _domain
from fastmta.spool.parked import CHANGES
from fastmta.spool.records import PENDING as _PENDING
from fastmta.spool.records import Envelope

__all__ = ["MAX_REASON", "Selection", "bounce_reason", "check_reason", "command_change"]

MAX_REASON = 200  # characters of an operator's bounce reason (it goes into the DSN)
_DEFAULT_REASON = "Delivery cancelled by the mail system administrator"


class Selection:
    """Queue ids, every message (``all``), recipient domains, senders (see the module
    docstring). A sender ``"<>"`` or ``""`` is the null sender (bounces). Domains and senders
    compare case-insensitively; a domain matches a recipient still to be delivered there."""

    __slots__ = ("all", "domains", "ids", "senders")

    def __init__(
        self,
        ids: Iterable[str] = (),
        all: bool = False,  # noqa: A002 - the CLI flag's name
        domains: Iterable[str] = (),
        senders: Iterable[str] = (),
    ) -> None:
        self.ids = frozenset(ids)
        self.all = all
        self.domains = frozenset(d.strip().lower().rstrip(".") for d in domains)
        self.senders = frozenset(
            "" if s.strip() == "<>" else s.strip().removeprefix("<").removesuffix(">").lower()
            for s in senders
        )

    @property
    def filtered(self) -> bool:
        """Domains or senders narrow the selection."""
        return bool(self.domains or self.senders)

    @property
    def empty(self) -> bool:
        """Nothing given: no ids, no --all, no filter (a changing command refuses that)."""
        return not (self.ids or self.all or self.filtered)

    def matches(self, env: Envelope) -> bool:
        """True when ``env`` is selected. An empty selection matches everything (``list``)."""
        if self.ids and env.id not in self.ids:
            return False
        if self.senders and env.sender.lower() not in self.senders:
            return False
        if self.domains:
            return any(
                r.state in _PENDING and _domain(r.address) in self.domains for r in env.recipients
            )
        return True

    def recipients(self, env: Envelope) -> list[int]:
        """Indexes of ``env``'s recipients still to be delivered that ``bounce`` concerns:
        those at the selected domains, or every one when no domain is given."""
        domains = self.domains
        return [
            i
            for i, r in enumerate(env.recipients)
            if r.state in _PENDING and (not domains or _domain(r.address) in domains)
        ]


def check_reason(reason: str) -> str | None:
    """Why ``reason`` cannot be a bounce reason (None: it can): it goes into a DSN as one
    line of text, so printable characters only, at most MAX_REASON of them."""
    if len(reason) > MAX_REASON:
        return f"the reason is {len(reason)} characters long; at most {MAX_REASON}"
    if not reason.isprintable():
        return "the reason must be one line of printable characters"
    return None


def bounce_reason(reason: str) -> str:
    """The text a bounced recipient's DSN reports (its last reply while the DSN waits)."""
    reason = "".join(c if c.isprintable() else " " for c in reason.strip())[:MAX_REASON]
    return f"{_DEFAULT_REASON}: {reason}" if reason else _DEFAULT_REASON


def command_change(
    cmd: str, select: Selection | None = None, reason: str = ""
) -> Callable[[Envelope], bool | None]:
    """What command ``cmd`` (hold, release, delete, flush, bounce) does to one envelope that
    is not in a worker's memory (a parked file, a stopped spool): returns False when
    ``select`` does not select it, None to delete it, True otherwise (found; maybe changed).
    ``reason``: the bounce's text (:func:`bounce_reason`)."""
    if cmd == "bounce":
        sel = select or Selection(all=True)
        text = reason or bounce_reason("")

        def change(env: Envelope) -> bool | None:
            env.cancel(sel.recipients(env), text)
            return True

    else:
        change = CHANGES[cmd]
    if select is None:
        return change
    return lambda env: change(env) if select.matches(env) else False
