"""The server drops the connection in the middle of the content: deferred, not lost; the
retry over a new connection delivers."""

from __future__ import annotations

import asyncio

from delivery_harness import Harness

from fastmta.spool import RcptState
from fastmta.testing.sink import Behaviour

BIG = b"Subject: big\r\n\r\n" + b"x" * 70 + b"\r\n" * 1 + (b"y" * 998 + b"\r\n") * 200


def test_disconnect_in_data_deferred_then_delivered(tmp_path):
    async def main():
        sinks = {"127.0.0.2": Behaviour(disconnect_in_data=True)}
        async with Harness(tmp_path, sinks, retry=0.3) as h:
            h.mx("example.test", (10, "mx1.example.test", "127.0.0.2"))
            sm = await h.send("a@sender.test", ["b@example.test"], BIG)
            await h.until(lambda: h.engine.stats.deferred >= 1)
            sink = h.sinks["127.0.0.2"]
            assert sink.count == 0
            env = sm.envelope
            assert env.recipients[0].state == RcptState.DEFERRED
            assert env.recipients[0].last_reply.startswith("451 4.4.2")
            rec = h.records()[0]
            assert rec["outcome"] == "deferred" and rec["code"] == 451
            sink.behaviour = Behaviour()
            await h.until(lambda: sink.count == 1)
            await h.until(lambda: h.live(env.id) is None)
            assert sink.messages[0].data == BIG

    asyncio.run(main())
