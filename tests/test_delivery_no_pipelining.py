"""A server without PIPELINING (and without CHUNKING): one command at a time, still delivered,
per-recipient replies still right."""

from __future__ import annotations

import asyncio

from delivery_harness import BODY, Harness

from fastmta.protocol.replies import reply
from fastmta.spool import RcptState
from fastmta.testing.sink import Behaviour


def test_no_pipelining(tmp_path):
    def rcpt(a: str):
        return reply(550, "5.1.1", "unknown") if a.startswith("x") else None

    async def main():
        b = Behaviour(pipelining=False, chunking=False, rcpt_reply=rcpt)
        h = Harness(
            tmp_path, {"127.0.0.2": b}, overrides={"delivery": {"max_connections_per_site": 1}}
        )
        async with h:
            h.mx("example.test", (10, "mx1.example.test", "127.0.0.2"))
            sms = [await h.send("", ["a@example.test", "x@example.test", "c@example.test"])
                   for _ in range(3)]  # fmt: skip
            sink = h.sinks["127.0.0.2"]
            await h.until(lambda: sink.count == 3)
            await h.until(lambda: len(h.spool) == 0)
            for m in sink.messages:
                assert m.recipients == ["a@example.test", "c@example.test"]
                assert m.data == BODY.replace(b"\r\n..", b"\r\n.")
            for sm in sms:
                states = [r.state for r in sm.envelope.recipients]
                assert states == [RcptState.DELIVERED, RcptState.BOUNCED, RcptState.DELIVERED]
            assert sink.connections == 1  # reused without pipelining too

    asyncio.run(main())
