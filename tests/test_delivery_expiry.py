"""A message still deferred after queue.max_lifetime is bounced with a DSN (outcome
"expired" in the log)."""

from __future__ import annotations

import asyncio

from delivery_harness import Harness

from fastmta.protocol.replies import reply
from fastmta.spool import RcptState
from fastmta.testing.sink import Behaviour


def test_expiry_bounces(tmp_path):
    def later(a: str):
        return reply(451, "4.2.1", "mailbox busy") if a.endswith("@example.test") else None

    async def main():
        sinks = {"127.0.0.2": Behaviour(rcpt_reply=later)}
        async with Harness(tmp_path, sinks, retry=0.2, max_lifetime=0.7) as h:
            h.mx("example.test", (10, "mx1.example.test", "127.0.0.2"))
            h.mx("sender.test", (10, "mx.sender.test", "127.0.0.2"))
            sm = await h.send("s@sender.test", ["b@example.test"])
            sink = h.sinks["127.0.0.2"]
            await h.until(lambda: sink.count == 1, timeout=5)  # the DSN
            await h.until(lambda: h.live(sm.envelope.id) is None)
            env = sm.envelope
            assert env.recipients[0].state == RcptState.BOUNCED
            assert env.attempts >= 2
            recs = [r for r in h.records() if r["queue_id"] == env.id]
            assert [r["outcome"] for r in recs[:-1]] == ["deferred"] * (len(recs) - 1)
            assert recs[-1]["outcome"] == "expired" and recs[-1]["code"] == 451
            assert recs[-1]["classification"] == "MessageExpired"
            dsn = sink.messages[0]
            assert dsn.sender == "" and b"Action: failed" in dsn.data
            assert b"mailbox busy" in dsn.data

    asyncio.run(main())
