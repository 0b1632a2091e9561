"""The bounce cannot be stored (a full disk: Spool.store raises SpoolError, as on ENOSPC). The
original must not be stranded: as Postfix does on a "bounce or trace service failure", the
recipients to report are deferred, the message keeps its retries, and the next attempt bounces
them again with their DSN. The same for a delay warning (sent at a later attempt instead)."""

from __future__ import annotations

import asyncio
import time

from delivery_harness import Harness

from fastmta.protocol.replies import reply
from fastmta.spool import SpoolError
from fastmta.testing.sink import Behaviour


def full_disk_for_dsns(h: Harness, times: int) -> dict:
    """Make the next ``times`` DSN stores fail as a full disk does; returns the counter."""
    real = h.spool.store
    left = {"n": times}

    async def store(env, data):
        if env.is_bounce and left["n"] > 0:
            left["n"] -= 1
            raise SpoolError("No space left on device", 28)
        return await real(env, data)

    h.spool.store = store
    return left


def test_deferred_recipient_keeps_retrying_and_bounce_is_made_later(tmp_path):
    state = {"b": reply(451, "4.2.1", "later")}

    def rcpt(a: str):
        return reply(550, "5.1.1", "no such user") if a.startswith("x@") else state["b"]

    async def main():
        sinks = {"127.0.0.2": Behaviour(rcpt_reply=rcpt), "127.0.0.3": Behaviour()}
        async with Harness(tmp_path, sinks, retry=0.2) as h:
            h.mx("ex.test", (10, "mx.ex.test", "127.0.0.2"))
            h.mx("sender.test", (10, "mx.sender.test", "127.0.0.3"))
            left = full_disk_for_dsns(h, 1)
            sm = await h.send("s@sender.test", ["x@ex.test", "b@ex.test"])
            qid = sm.envelope.id
            sender_mx = h.sinks["127.0.0.3"]
            await h.until(lambda: left["n"] == 0)
            # the next attempt bounces x again, and this time its DSN is stored and sent
            await h.until(lambda: sender_mx.count == 1, timeout=5)
            dsn = sender_mx.messages[0]
            assert dsn.recipients == ["s@sender.test"] and b"Action: failed" in dsn.data
            assert b"x@ex.test" in dsn.data and b"no such user" in dsn.data
            # b is still retried (not stranded), and is delivered once the host takes it
            attempts = h.live(qid).envelope.attempts
            await h.until(lambda: h.live(qid).envelope.attempts >= attempts + 2, timeout=5)
            state["b"] = None
            await h.until(lambda: h.live(qid) is None)
            assert h.engine.scheduler.active == 0  # no slot leaked
            assert sender_mx.count == 1  # one bounce, not one per attempt
            deferred = [r for r in h.records() if r["text"].startswith("bounce notice not")]
            assert [r["recipient"] for r in deferred] == ["x@ex.test"]

    asyncio.run(main())


def test_all_final_but_bounce_not_stored_message_stays_until_it_is(tmp_path):
    def rcpt(a: str):
        return reply(550, "5.1.1", "no such user")

    async def main():
        sinks = {"127.0.0.2": Behaviour(rcpt_reply=rcpt), "127.0.0.3": Behaviour()}
        async with Harness(tmp_path, sinks, retry=0.2) as h:
            h.mx("ex.test", (10, "mx.ex.test", "127.0.0.2"))
            h.mx("sender.test", (10, "mx.sender.test", "127.0.0.3"))
            left = full_disk_for_dsns(h, 2)
            sm = await h.send("s@sender.test", ["x@ex.test"])
            await h.until(lambda: left["n"] == 0)
            assert h.live(sm.envelope.id) is not None  # not done without its bounce
            await h.until(lambda: h.live(sm.envelope.id) is None, timeout=5)
            await h.until(lambda: h.sinks["127.0.0.3"].count == 1, timeout=5)
            assert b"Action: failed" in h.sinks["127.0.0.3"].messages[0].data
            assert h.engine.scheduler.active == 0

    asyncio.run(main())


def test_delay_warning_not_stored_is_sent_at_a_later_attempt(tmp_path):
    def busy(a: str):
        return reply(451, "4.2.1", "mailbox busy") if a.endswith("@ex.test") else None

    async def main():
        sinks = {"127.0.0.2": Behaviour(rcpt_reply=busy), "127.0.0.3": Behaviour()}
        overrides = {"queue": {"delay_warning": 0.1}}
        async with Harness(tmp_path, sinks, overrides=overrides, retry=0.2) as h:
            h.mx("ex.test", (10, "mx.ex.test", "127.0.0.2"))
            h.mx("sender.test", (10, "mx.sender.test", "127.0.0.3"))
            left = full_disk_for_dsns(h, 1)
            # (queued a second ago: the first attempt's warning is due)
            sm = await h.send("s@sender.test", ["b@ex.test"], arrival=time.time() - 1)
            await h.until(lambda: left["n"] == 0)
            await h.until(lambda: h.sinks["127.0.0.3"].count == 1, timeout=5)
            assert b"Action: delayed" in h.sinks["127.0.0.3"].messages[0].data
            await h.until(lambda: h.live(sm.envelope.id).envelope.warned, timeout=5)
            await asyncio.sleep(0.5)
            assert h.sinks["127.0.0.3"].count == 1  # once

    asyncio.run(main())
