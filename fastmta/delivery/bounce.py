"""Final outcomes -> one RFC 3464 DSN per message per attempt, queued like any message.

:func:`make_dsn` picks the recipients that asked for a notice (RFC 3461 section 4.1: NOTIFY
absent means FAILURE, and DELAY at the MTA's discretion; SUCCESS only when asked for; NEVER
means none), builds the report
with :func:`fastmta.delivery.dsn.build_dsn` (RET, ENVID and ORCPT honoured) and returns the
envelope and wire bytes to store: from the null sender (RFC 5321 section 4.5.5), marked
``is_bounce`` so it is never bounced itself (:func:`should_bounce`).
"""

from __future__ import annotations

import time
from typing import Literal

import msgspec

from fastmta.delivery.dsn import FailedRecipient, build_dsn, should_bounce
from fastmta.headers import header_block_end, message_id
from fastmta.spool.records import Envelope, Recipient, new_queue_id

__all__ = ["Failure", "make_dsn", "wants_notice"]


class Failure(msgspec.Struct, gc=False):
    """One recipient to report: its index in the envelope, the reply text, the remote MTA.
    ``action`` is for success notices (RFC 3464 2.3.3): "delivered" (into a mailbox here)
    or "relayed" (to a next hop that does not offer DSN); otherwise the kind's."""

    index: int
    code: int
    enhanced: str | None
    text: str
    remote_mta: str | None = None
    action: Literal["delivered", "relayed"] = "delivered"


_KEYWORD = {"failure": "FAILURE", "delay": "DELAY", "success": "SUCCESS"}


def wants_notice(notify: str | None, kind: str) -> bool:
    """RFC 3461 4.1: NOTIFY=NEVER -> no DSN; an explicit list must name FAILURE, DELAY or
    SUCCESS; no NOTIFY means "FAILURE,DELAY" (a success notice only when asked for)."""
    if notify is None:
        return kind != "success"
    values = {v.strip().upper() for v in notify.split(",")}
    if "NEVER" in values:
        return False
    return _KEYWORD[kind] in values


def _status(f: Failure) -> str:
    if f.enhanced:
        return f.enhanced
    # RFC 3463 section 3.1: the class digit follows the reply's (2 success, 4, 5 failure)
    return f"{f.code // 100}.0.0" if f.code // 100 in (2, 4, 5) else "5.0.0"


def make_dsn(
    env: Envelope,
    failures: list[Failure],
    original: bytes,
    *,
    reporting_mta: str,
    kind: Literal["failure", "delay", "success"] = "failure",
    retry_until: float | None = None,
    now: float | None = None,
) -> tuple[Envelope, bytes] | None:
    """The DSN for ``failures`` of ``env`` as (envelope, wire form), or None when no DSN is
    due: a bounce of a bounce, a null sender, or no recipient wants one (NOTIFY). For
    ``kind="success"`` the "failures" are the deliveries to report (their ``action``)."""
    if not should_bounce(env.sender, env.is_bounce):
        return None
    now = time.time() if now is None else now
    listed: list[FailedRecipient] = []
    action = {"failure": "failed", "delay": "delayed"}.get(kind)
    for f in failures:
        rcpt = env.recipients[f.index]
        if not wants_notice(rcpt.notify, kind):
            continue
        diag = f"{f.code} {f.enhanced + ' ' if f.enhanced else ''}{f.text}".strip()
        listed.append(
            FailedRecipient(
                rcpt.address,
                orcpt=rcpt.orcpt,
                action=action or f.action,  # type: ignore[arg-type]
                status=_status(f),
                diagnostic=diag,
                remote_mta=f.remote_mta or None,
                last_attempt=now,
            )
        )
    if not listed:
        return None
    data = build_dsn(
        reporting_mta=reporting_mta,
        envelope_id=env.envid,
        original_sender=env.sender,
        arrival=env.arrival,
        recipients=listed,
        original=original,
        ret=env.ret,
        kind=kind,
        queue_id=env.id,
        retry_until=retry_until,
        now=now,
    )
    dsn_env = Envelope(
        id=new_queue_id(),
        sender="",
        recipients=[Recipient(env.sender)],
        arrival=now,
        body=None if data.isascii() else "8BITMIME",
        smtputf8=not env.sender.isascii(),
        is_bounce=True,
        message_id=message_id(header_block_end([data])[0]),
    )
    return dsn_env, data
