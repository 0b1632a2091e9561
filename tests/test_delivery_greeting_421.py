"""A 421 greeting (RFC 5321 3.8): move on to the next MX; the only MX -> deferred."""

from __future__ import annotations

import asyncio

from delivery_harness import Harness

from fastmta.protocol.replies import reply
from fastmta.spool import RcptState
from fastmta.testing.sink import Behaviour

BUSY = Behaviour(greeting=reply(421, "4.3.2", "busy"))


def test_421_greeting_next_mx(tmp_path):
    async def main():
        async with Harness(tmp_path, {"127.0.0.2": BUSY, "127.0.0.3": Behaviour()}) as h:
            h.mx("example.test", (10, "mx1.example.test", "127.0.0.2"),
                 (20, "mx2.example.test", "127.0.0.3"))  # fmt: skip
            sm = await h.send("a@sender.test", ["b@example.test"])
            await h.until(lambda: h.sinks["127.0.0.3"].count == 1)
            await h.until(lambda: h.live(sm.envelope.id) is None)
            assert h.sinks["127.0.0.2"].connections >= 1
            assert h.records()[0]["mx"] == "mx2.example.test"

    asyncio.run(main())


def test_421_greeting_only_mx_deferred_then_delivered(tmp_path):
    async def main():
        async with Harness(tmp_path, {"127.0.0.2": BUSY}, retry=0.3) as h:
            h.mx("example.test", (10, "mx1.example.test", "127.0.0.2"))
            sm = await h.send("a@sender.test", ["b@example.test"])
            await h.until(lambda: h.engine.stats.deferred == 1)
            env = h.live(sm.envelope.id).envelope
            assert env.recipients[0].state == RcptState.DEFERRED
            assert env.recipients[0].last_reply.startswith("421 4.3.2")
            h.sinks["127.0.0.2"].behaviour = Behaviour()
            await h.until(lambda: h.sinks["127.0.0.2"].count == 1)
            await h.until(lambda: h.live(sm.envelope.id) is None)
            outcomes = [(r["outcome"], r["attempt"]) for r in h.records()]
            assert outcomes == [("deferred", 1), ("delivered", 2)]

    asyncio.run(main())
