"""5xx after the content: bounced; the DSN reaches the sender's MX from the null sender; a
bounce of a bounce is never sent; NOTIFY=NEVER means no DSN."""

from __future__ import annotations

import asyncio

from delivery_harness import Harness

from fastmta.protocol.replies import reply
from fastmta.spool import RcptState, Recipient
from fastmta.testing.sink import Behaviour

REJECT = Behaviour(data_reply=lambda m: reply(554, "5.7.1", "content rejected"))


def test_data_5xx_bounce_dsn(tmp_path):
    async def main():
        sinks = {"127.0.0.2": REJECT, "127.0.0.3": Behaviour()}
        async with Harness(tmp_path, sinks) as h:
            h.mx("example.test", (10, "mx1.example.test", "127.0.0.2"))
            h.mx("sender.test", (10, "mx.sender.test", "127.0.0.3"))
            sm = await h.send("s@sender.test", [Recipient("a@example.test", orcpt="rfc822;a@example.test"),
                                                 "b@example.test"], envid="ENV123", ret="HDRS")  # fmt: skip
            back = h.sinks["127.0.0.3"]
            await h.until(lambda: back.count == 1)
            await h.until(lambda: len(h.spool) == 0)
            assert h.live(sm.envelope.id) is None
            dsn = back.messages[0]
            assert dsn.sender == "" and dsn.recipients == ["s@sender.test"]
            text = dsn.data
            assert b"multipart/report" in text and b"report-type=delivery-status" in text
            assert text.count(b"Action: failed") == 2
            assert b"Status: 5.7.1" in text and b"content rejected" in text
            assert b"Original-Envelope-Id: ENV123" in text
            assert b"Original-Recipient: rfc822; a@example.test" in text
            assert b"text/rfc822-headers" in text and b"Subject: test" in text
            recs = [r for r in h.records() if r["queue_id"] == sm.envelope.id]
            assert [(r["outcome"], r["code"]) for r in recs] == [("bounced", 554)] * 2
            assert h.engine.stats.dsns == 1

    asyncio.run(main())


def test_no_bounce_for_a_bounce_and_notify_never(tmp_path):
    async def main():
        sinks = {"127.0.0.2": REJECT}
        async with Harness(tmp_path, sinks) as h:
            h.mx("example.test", (10, "mx1.example.test", "127.0.0.2"))
            # the sender's domain rejects too: the DSN itself bounces, and that must stop there
            h.mx("sender.test", (10, "mx.sender.test", "127.0.0.2"))
            sm = await h.send("s@sender.test", ["a@example.test"])
            await h.until(lambda: len(h.spool) == 0 and h.engine.stats.bounced == 2)
            await asyncio.sleep(0.2)
            assert h.engine.stats.dsns == 1 and h.engine.stats.bounced == 2
            assert h.live(sm.envelope.id) is None
            # NOTIFY=NEVER: bounced, no DSN at all
            await h.send("s@sender.test", [Recipient("n@example.test", notify="NEVER")])
            await h.until(lambda: h.engine.stats.bounced == 3)
            await asyncio.sleep(0.2)
            assert h.engine.stats.dsns == 1 and len(h.spool) == 0

    asyncio.run(main())


def test_null_sender_never_bounced(tmp_path):
    async def main():
        async with Harness(tmp_path, {"127.0.0.2": REJECT}) as h:
            h.mx("example.test", (10, "mx1.example.test", "127.0.0.2"))
            sm = await h.send("", ["a@example.test"])
            await h.until(lambda: h.live(sm.envelope.id) is None)
            assert h.engine.stats.dsns == 0
            assert h.records()[0]["outcome"] == "bounced"
            assert sm.envelope.recipients[0].state == RcptState.BOUNCED

    asyncio.run(main())
