"""421 after the greeting, to a fresh connection's first transaction (RFC 5321 3.8: the server
is closing): a failure of that host, as a 421 greeting is. The next MX host gets the mail
(Postfix does the same); when every host fails, the recipients are deferred with the last
reply."""

from __future__ import annotations

import asyncio

from delivery_harness import Harness

from fastmta.protocol.replies import reply
from fastmta.spool import RcptState
from fastmta.testing.sink import Behaviour

TOO_MANY = reply(421, "4.7.0", "Too many concurrent SMTP connections")
BUSY_AT_MAIL = Behaviour(mail_reply=lambda sender: TOO_MANY)
BUSY_AT_RCPT = Behaviour(rcpt_reply=lambda rcpt: TOO_MANY)


def _two_mx(h: Harness) -> None:
    h.mx("example.test", (10, "mx1.example.test", "127.0.0.2"),
         (20, "mx2.example.test", "127.0.0.3"))  # fmt: skip


def test_421_at_mail_next_mx(tmp_path):
    async def main():
        async with Harness(tmp_path, {"127.0.0.2": BUSY_AT_MAIL, "127.0.0.3": Behaviour()}) as h:
            _two_mx(h)
            sm = await h.send("a@sender.test", ["b@example.test", "c@example.test"])
            await h.until(lambda: h.live(sm.envelope.id) is None)
            assert h.sinks["127.0.0.3"].count == 1
            assert h.sinks["127.0.0.2"].connections == 1
            recs = h.records()
            assert [(r["outcome"], r["mx"], r["attempt"]) for r in recs] == [
                ("delivered", "mx2.example.test", 1)
            ] * 2
            assert h.engine.stats.deferred == 0

    asyncio.run(main())


def test_421_before_any_rcpt_answered_next_mx(tmp_path):
    async def main():
        async with Harness(tmp_path, {"127.0.0.2": BUSY_AT_RCPT, "127.0.0.3": Behaviour()}) as h:
            _two_mx(h)
            sm = await h.send("a@sender.test", ["b@example.test"])
            await h.until(lambda: h.live(sm.envelope.id) is None)
            assert h.sinks["127.0.0.3"].count == 1
            assert [(r["outcome"], r["mx"]) for r in h.records()] == [
                ("delivered", "mx2.example.test")
            ]

    asyncio.run(main())


def test_421_at_every_mx_deferred_with_last_reply(tmp_path):
    async def main():
        last = reply(421, "4.3.2", "mx2 shutting down")
        sinks = {"127.0.0.2": BUSY_AT_MAIL, "127.0.0.3": Behaviour(mail_reply=lambda s: last)}
        async with Harness(tmp_path, sinks, retry=60) as h:
            _two_mx(h)
            sm = await h.send("a@sender.test", ["b@example.test"])
            await h.until(lambda: h.engine.stats.deferred == 1)
            await asyncio.sleep(0.2)  # nothing more happens: each host once
            env = h.live(sm.envelope.id).envelope
            assert env.recipients[0].state == RcptState.DEFERRED
            assert env.recipients[0].last_reply.startswith("421 4.3.2 mx2 shutting down")
            assert env.attempts == 1
            assert h.sinks["127.0.0.2"].connections == 1 and h.sinks["127.0.0.3"].connections == 1
            assert [(r["outcome"], r["mx"]) for r in h.records()] == [
                ("deferred", "mx2.example.test")
            ]

    asyncio.run(main())


def test_421_at_mail_backup_dead_deferred(tmp_path):
    async def main():
        # nothing listens on 127.0.0.3: the backup's connect failure is the last reason
        async with Harness(tmp_path, {"127.0.0.2": BUSY_AT_MAIL}, retry=60) as h:
            _two_mx(h)
            sm = await h.send("a@sender.test", ["b@example.test"])
            await h.until(lambda: h.engine.stats.deferred == 1)
            env = h.live(sm.envelope.id).envelope
            assert env.recipients[0].state == RcptState.DEFERRED
            assert env.recipients[0].last_reply.startswith("451 4.4.1")
            assert h.sinks["127.0.0.2"].connections == 1

    asyncio.run(main())


def test_421_at_mail_only_mx_deferred_then_delivered(tmp_path):
    async def main():
        async with Harness(tmp_path, {"127.0.0.2": BUSY_AT_MAIL}, retry=0.3) as h:
            h.mx("example.test", (10, "mx1.example.test", "127.0.0.2"))
            sm = await h.send("a@sender.test", ["b@example.test"])
            await h.until(lambda: h.engine.stats.deferred == 1)
            env = h.live(sm.envelope.id).envelope
            assert env.recipients[0].last_reply.startswith("421 4.7.0")
            assert h.sinks["127.0.0.2"].connections == 1
            h.sinks["127.0.0.2"].behaviour = Behaviour()
            await h.until(lambda: h.live(sm.envelope.id) is None)
            outcomes = [(r["outcome"], r["attempt"]) for r in h.records()]
            assert outcomes == [("deferred", 1), ("delivered", 2)]

    asyncio.run(main())


def test_421_at_mail_backup_is_myself_deferred(tmp_path):
    async def main():
        # the backup MX greets with our own name: we are it, and wait for the better one
        myself = Behaviour(greeting=reply(220, None, "mta.test ESMTP fastmta"))
        sinks = {"127.0.0.2": BUSY_AT_MAIL, "127.0.0.3": myself}
        async with Harness(tmp_path, sinks, retry=60) as h:
            _two_mx(h)
            sm = await h.send("a@sender.test", ["b@example.test"])
            await h.until(lambda: h.engine.stats.deferred == 1)
            env = h.live(sm.envelope.id).envelope
            assert env.recipients[0].state == RcptState.DEFERRED  # not bounced 5.4.6
            assert env.recipients[0].last_reply.startswith("421 4.7.0")
            assert h.sinks["127.0.0.3"].transactions == 0

    asyncio.run(main())


def test_421_on_a_reused_connection_is_tried_again_at_once(tmp_path):
    """A server that closes a connection after some messages with 421 at MAIL: the message
    goes again over a fresh connection at once, not after a retry interval."""
    mails = []

    def second_mail_421(sender: str):
        mails.append(sender)
        return TOO_MANY if len(mails) == 2 else None

    async def main():
        sinks = {"127.0.0.2": Behaviour(mail_reply=second_mail_421)}
        async with Harness(tmp_path, sinks, retry=60) as h:
            h.mx("example.test", (10, "mx1.example.test", "127.0.0.2"))
            first = await h.send("a@sender.test", ["b@example.test"])
            await h.until(lambda: h.live(first.envelope.id) is None)
            second = await h.send("a@sender.test", ["c@example.test"])
            await h.until(lambda: h.live(second.envelope.id) is None)
            assert h.sinks["127.0.0.2"].count == 2 and len(mails) == 3
            assert h.sinks["127.0.0.2"].connections == 2
            assert [(r["outcome"], r["attempt"]) for r in h.records()] == [("delivered", 1)] * 2
            assert h.engine.stats.deferred == 0

    asyncio.run(main())
