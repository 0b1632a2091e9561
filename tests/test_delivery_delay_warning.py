"""A message still deferred after queue.delay_warning gets one "delayed" DSN (RFC 3464
Action: delayed), and delivery goes on; the spool remembers the warning across a restart."""

from __future__ import annotations

import asyncio

from delivery_harness import Harness

from fastmta.protocol.replies import reply
from fastmta.testing.sink import Behaviour


def test_delay_warning_once_then_delivered(tmp_path):
    state = {"busy": True}

    def busy(a: str):
        if a.endswith("@example.test") and state["busy"]:
            return reply(451, "4.2.1", "mailbox busy")
        return None

    async def main():
        sinks = {"127.0.0.2": Behaviour(rcpt_reply=busy)}
        overrides = {"queue": {"delay_warning": 0.5}}
        async with Harness(tmp_path, sinks, overrides=overrides, retry=0.2) as h:
            h.mx("example.test", (10, "mx1.example.test", "127.0.0.2"))
            h.mx("sender.test", (10, "mx.sender.test", "127.0.0.2"))
            sm = await h.send("s@sender.test", ["b@example.test"])
            sink = h.sinks["127.0.0.2"]
            await h.until(lambda: sink.count == 1, timeout=5)  # the delay DSN
            dsn = sink.messages[0]
            assert dsn.sender == "" and dsn.recipients == ["s@sender.test"]
            assert b"Action: delayed" in dsn.data and b"mailbox busy" in dsn.data
            await asyncio.sleep(0.8)  # more deferred attempts: no second warning
            assert sink.count == 1 and sm.envelope.attempts >= 3
            await h.close()  # a restart: the warning is in the spool, not only in memory
            await h.open()
            qid = sm.envelope.id
            assert h.live(qid).envelope.warned
            attempts = h.live(qid).envelope.attempts
            await h.until(lambda: h.live(qid).envelope.attempts >= attempts + 3, timeout=5)
            assert sink.count == 1
            state["busy"] = False
            await h.until(lambda: h.live(qid) is None)
            assert [r["outcome"] for r in h.records()][-1] == "delivered"
            assert sink.count == 2

    asyncio.run(main())
