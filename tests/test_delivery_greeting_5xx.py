"""A 5xx greeting (RFC 5321 3.1: "554" instead of "220"): as Postfix's smtp_skip_5xx_greeting
(yes by default), try the next MX; with none left, defer. Such refusals are mostly temporary
(a block list entry, a server under load), so the mail is not bounced."""

from __future__ import annotations

import asyncio

from delivery_harness import Harness

from fastmta.protocol.replies import reply
from fastmta.spool import RcptState
from fastmta.testing.sink import Behaviour

BLOCKED = Behaviour(greeting=reply(554, "5.7.1", "Service unavailable; client host blocked"))


def test_554_greeting_next_mx(tmp_path):
    async def main():
        async with Harness(tmp_path, {"127.0.0.2": BLOCKED, "127.0.0.3": Behaviour()}) as h:
            h.mx("example.test", (10, "mx1.example.test", "127.0.0.2"),
                 (20, "mx2.example.test", "127.0.0.3"))  # fmt: skip
            sm = await h.send("a@sender.test", ["b@example.test"])
            await h.until(lambda: h.live(sm.envelope.id) is None)
            assert h.sinks["127.0.0.3"].count == 1 and h.sinks["127.0.0.2"].connections >= 1
            assert [(r["outcome"], r["mx"]) for r in h.records()] == [
                ("delivered", "mx2.example.test")
            ]

    asyncio.run(main())


def test_554_greeting_only_mx_deferred_not_bounced(tmp_path):
    async def main():
        sinks = {"127.0.0.2": BLOCKED, "127.0.0.3": Behaviour()}  # .3: the senders' MX (DSNs)
        async with Harness(tmp_path, sinks, retry=0.5) as h:
            h.mx("example.test", (10, "mx.example.test", "127.0.0.2"))
            h.mx("sender.test", (10, "mx.sender.test", "127.0.0.3"))
            sms = [await h.send("a@sender.test", [f"u{i}@example.test"]) for i in range(3)]
            await h.until(lambda: h.engine.stats.deferred == 3)
            for sm in sms:
                (rcpt,) = h.live(sm.envelope.id).envelope.recipients
                assert rcpt.state == RcptState.DEFERRED
                assert rcpt.last_reply.startswith(
                    "454 4.7.1 mx.example.test[127.0.0.2] refused to talk to me: 554 5.7.1 "
                    "Service unavailable"
                )
            assert {(r["outcome"], r["code"]) for r in h.records()} == {("deferred", 454)}
            assert h.sinks["127.0.0.3"].count == 0  # no DSN
            h.sinks["127.0.0.2"].behaviour = Behaviour()  # the block is lifted
            await h.until(lambda: all(h.live(sm.envelope.id) is None for sm in sms))
            assert h.sinks["127.0.0.2"].count == 3 and h.sinks["127.0.0.3"].count == 0

    asyncio.run(main())
