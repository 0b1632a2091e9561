"""A server that closes right behind its EHLO reply (421 in the same packet, RFC 5321 3.8):
the message is deferred with that reply, and the site's worker lives on to deliver it later."""

from __future__ import annotations

import asyncio

import pytest
from delivery_harness import Harness

from fastmta.protocol.replies import reply
from fastmta.spool import RcptState
from fastmta.testing.sink import Behaviour

BYE = reply(421, "4.3.2", "shutting down")


@pytest.mark.parametrize("starttls", [False, True], ids=["plain", "starttls-offered"])
def test_421_behind_ehlo_defers_then_delivers(tmp_path, caplog, starttls):
    """With STARTTLS offered the client's next step is STARTTLS, not MAIL: same outcome."""
    going_down = Behaviour(close_after_ehlo=BYE, starttls=starttls)

    async def main():
        async with Harness(tmp_path, {"127.0.0.2": going_down}, retry=0.3) as h:
            h.mx("example.test", (10, "mx1.example.test", "127.0.0.2"))
            sm = await h.send("a@sender.test", ["b@example.test", "c@example.test"])
            await h.until(lambda: h.engine.stats.deferred == 2)
            env = h.live(sm.envelope.id).envelope
            assert [r.state for r in env.recipients] == [RcptState.DEFERRED] * 2
            assert all(r.last_reply.startswith("421 4.3.2") for r in env.recipients)
            h.sinks["127.0.0.2"].behaviour = Behaviour()
            await h.until(lambda: h.sinks["127.0.0.2"].count == 1)
            await h.until(lambda: h.live(sm.envelope.id) is None)

    asyncio.run(main())
    assert not [r for r in caplog.records if r.exc_info], "a delivery worker failed"
