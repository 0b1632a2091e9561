"""An MX that leads back to this MTA (it greets with our own name): bounced 5.4.6 at once,
like Postfix's "mail for ... loops back to myself", instead of circling until the hop limit;
a lower-preference MX that is someone else still gets the mail."""

from __future__ import annotations

import asyncio

from delivery_harness import Harness

from fastmta.protocol.replies import reply
from fastmta.spool import RcptState
from fastmta.testing.sink import Behaviour

MYSELF = Behaviour(greeting=reply(220, None, "mta.test ESMTP fastmta"))  # the harness's name


def test_loop_back_to_myself_bounces(tmp_path):
    async def main():
        sinks = {"127.0.0.2": MYSELF, "127.0.0.3": Behaviour()}
        async with Harness(tmp_path, sinks) as h:
            h.mx("loop.test", (10, "mx.loop.test", "127.0.0.2"))
            h.mx("sender.test", (10, "mx.sender.test", "127.0.0.3"))
            sm = await h.send("a@sender.test", ["b@loop.test"])
            dsn_sink = h.sinks["127.0.0.3"]
            await h.until(lambda: dsn_sink.count == 1)
            await h.until(lambda: h.live(sm.envelope.id) is None)
            assert sm.envelope.recipients[0].state == RcptState.BOUNCED
            (rec,) = [r for r in h.records() if r["queue_id"] == sm.envelope.id]
            assert (rec["outcome"], rec["code"], rec["enhanced"]) == ("bounced", 550, "5.4.6")
            assert "loops back to myself" in rec["text"]
            dsn = dsn_sink.messages[0]
            assert dsn.sender == "" and dsn.recipients == ["a@sender.test"]
            assert b"Status: 5.4.6" in dsn.data
            assert h.sinks["127.0.0.2"].transactions == 0  # never a MAIL FROM to ourselves

    asyncio.run(main())


def test_loop_on_first_mx_next_mx_delivers(tmp_path):
    async def main():
        sinks = {"127.0.0.2": MYSELF, "127.0.0.3": Behaviour()}
        async with Harness(tmp_path, sinks) as h:
            h.mx("example.test", (10, "mx1.example.test", "127.0.0.2"),
                 (20, "mx2.example.test", "127.0.0.3"))  # fmt: skip
            sm = await h.send("a@sender.test", ["b@example.test"])
            await h.until(lambda: h.sinks["127.0.0.3"].count == 1)
            await h.until(lambda: h.live(sm.envelope.id) is None)
            assert h.records()[0]["mx"] == "mx2.example.test"

    asyncio.run(main())
