"""A server that never answers the final dot, or greets too slowly: the phase timeout fires,
the recipients are deferred with 451 4.4.2, and nothing hangs."""

from __future__ import annotations

import asyncio
import time

from delivery_harness import Harness

from fastmta.spool import RcptState
from fastmta.testing.sink import Behaviour


def test_data_done_timeout(tmp_path):
    async def main():
        h = Harness(tmp_path, {"127.0.0.2": Behaviour(stall_after_data=True)}, retry=60,
                    overrides={"delivery": {"data_done_timeout": 0.4}})  # fmt: skip
        async with h:
            h.mx("example.test", (10, "mx1.example.test", "127.0.0.2"))
            t0 = time.monotonic()
            sm = await h.send("a@sender.test", ["b@example.test"])
            await h.until(lambda: h.engine.stats.deferred == 1, timeout=5)
            assert 0.35 < time.monotonic() - t0 < 2.5
            rc = sm.envelope.recipients[0]
            assert rc.state == RcptState.DEFERRED
            assert rc.last_reply.startswith("451 4.4.2") and "data_done" in rc.last_reply
            assert h.records()[0]["outcome"] == "deferred"

    asyncio.run(main())


def test_greeting_timeout(tmp_path):
    async def main():
        h = Harness(tmp_path, {"127.0.0.2": Behaviour(delay=1.0)}, retry=60,
                    overrides={"delivery": {"greeting_timeout": 0.3}})  # fmt: skip
        async with h:
            h.mx("example.test", (10, "mx1.example.test", "127.0.0.2"))
            sm = await h.send("a@sender.test", ["b@example.test"])
            await h.until(lambda: h.engine.stats.deferred == 1, timeout=5)
            rc = sm.envelope.recipients[0]
            assert rc.last_reply.startswith("451 4.4.2") and "greeting" in rc.last_reply

    asyncio.run(main())
