"""The first MX host refuses connections: the next one gets the mail; all dead -> deferred."""

from __future__ import annotations

import asyncio

from delivery_harness import Harness

from fastmta.spool import RcptState


def test_first_mx_dead_second_delivers(tmp_path):
    async def main():
        async with Harness(tmp_path) as h:  # nothing listens on 127.0.0.3
            h.mx("example.test", (10, "mx1.example.test", "127.0.0.3"),
                 (20, "mx2.example.test", "127.0.0.2"))  # fmt: skip
            sm = await h.send("a@sender.test", ["b@example.test"])
            await h.until(lambda: h.sinks["127.0.0.2"].count == 1)
            await h.until(lambda: h.live(sm.envelope.id) is None)
            (rec,) = h.records()
            assert rec["outcome"] == "delivered" and rec["mx"] == "mx2.example.test"
            assert rec["ip"] == "127.0.0.2"

    asyncio.run(main())


def test_all_mx_dead_deferred(tmp_path):
    async def main():
        async with Harness(tmp_path, {}, retry=60) as h:
            h.mx("example.test", (10, "mx1.example.test", "127.0.0.3"),
                 (20, "mx2.example.test", "127.0.0.4"))  # fmt: skip
            sm = await h.send("a@sender.test", ["b@example.test", "c@example.test"])
            await h.until(lambda: h.engine.stats.deferred == 2)
            env = h.live(sm.envelope.id).envelope
            assert [r.state for r in env.recipients] == [RcptState.DEFERRED] * 2
            assert env.recipients[0].last_reply.startswith("451 4.4.1")
            assert env.attempts == 1 and env.next_attempt > env.arrival + 30
            recs = h.records()
            assert {r["outcome"] for r in recs} == {"deferred"} and recs[0]["code"] == 451
            assert h.engine.stats.queued == 1 and h.engine.stats.in_memory == 0

    asyncio.run(main())
