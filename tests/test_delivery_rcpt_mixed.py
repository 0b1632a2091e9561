"""4xx for some recipients, 2xx for others: per-recipient spool state, the rest on retry;
5xx for one recipient: a DSN listing only it."""

from __future__ import annotations

import asyncio

from delivery_harness import Harness

from fastmta.protocol.replies import reply
from fastmta.spool import RcptState
from fastmta.testing.sink import Behaviour


def _later(a: str):
    return reply(451, "4.2.1", "later") if a.startswith("b") else None


def test_mixed_4xx_2xx_then_retry(tmp_path):
    async def main():
        sinks = {"127.0.0.2": Behaviour(rcpt_reply=_later)}
        # idle_timeout < retry: the retry opens a new connection, which sees the new behaviour
        h = Harness(tmp_path, sinks, retry=0.5, overrides={"delivery": {"idle_timeout": 0.1}})
        async with h:
            h.mx("example.test", (10, "mx1.example.test", "127.0.0.2"))
            sm = await h.send(
                "s@sender.test", ["a@example.test", "b@example.test", "c@example.test"]
            )
            sink = h.sinks["127.0.0.2"]
            await h.until(lambda: sink.count == 1 and h.engine.stats.in_memory == 0)
            assert sink.messages[0].recipients == ["a@example.test", "c@example.test"]
            env = h.live(sm.envelope.id).envelope
            states = [r.state for r in env.recipients]
            assert states == [RcptState.DELIVERED, RcptState.DEFERRED, RcptState.DELIVERED]
            assert env.recipients[1].last_reply == "451 4.2.1 later"
            assert env.attempts == 1
            await h.spool.flush()
            sink.behaviour = Behaviour()
            await h.until(lambda: sink.count == 2)
            await h.until(lambda: h.live(sm.envelope.id) is None)
            assert sink.messages[1].recipients == ["b@example.test"]  # only the rest
            recs = [(r["recipient"], r["outcome"], r["attempt"]) for r in h.records()]
            assert recs == [
                ("a@example.test", "delivered", 1),
                ("b@example.test", "deferred", 1),
                ("c@example.test", "delivered", 1),
                ("b@example.test", "delivered", 2),
            ]

    asyncio.run(main())


def test_one_rcpt_5xx_bounces_only_it(tmp_path):
    def unknown(a: str):
        return reply(550, "5.1.1", "no such user") if a.startswith("x") else None

    async def main():
        sinks = {"127.0.0.2": Behaviour(rcpt_reply=unknown), "127.0.0.3": Behaviour()}
        async with Harness(tmp_path, sinks) as h:
            h.mx("example.test", (10, "mx1.example.test", "127.0.0.2"))
            h.mx("sender.test", (10, "mx.sender.test", "127.0.0.3"))
            sm = await h.send("s@sender.test", ["a@example.test", "x@example.test"])
            await h.until(lambda: h.sinks["127.0.0.3"].count == 1)
            assert h.live(sm.envelope.id) is None
            dsn = h.sinks["127.0.0.3"].messages[0]
            assert dsn.sender == "" and dsn.recipients == ["s@sender.test"]
            assert b"Final-Recipient: rfc822; x@example.test" in dsn.data
            assert b"a@example.test" not in dsn.data.split(b"Undelivered Message")[0]
            assert b"Status: 5.1.1" in dsn.data
            by = {r["recipient"]: r for r in h.records()}
            assert by["x@example.test"]["classification"] == "InvalidRecipient"
            assert by["a@example.test"]["classification"] == ""  # delivered: none
            assert h.engine.stats.failures == {"InvalidRecipient": 1}  # (metrics, queue stats)

    asyncio.run(main())


def test_per_domain_recipients_per_transaction(tmp_path):
    """[domain."x"] recipients_per_transaction: 5 recipients at a domain limited to 2 go as
    three transactions; another domain on the same MX keeps the global limit (one)."""

    async def main():
        over = {"domain": {"small.test": {"recipients_per_transaction": 2}}}
        async with Harness(tmp_path, overrides=over) as h:
            h.mx("small.test", (10, "mx1.example.test", "127.0.0.2"))
            h.mx("big.test", (10, "mx1.example.test", "127.0.0.2"))
            rcpts = [f"u{i}@small.test" for i in range(5)] + [f"v{i}@big.test" for i in range(5)]
            sm = await h.send("s@sender.test", rcpts)
            sink = h.sinks["127.0.0.2"]
            await h.until(lambda: h.live(sm.envelope.id) is None)
            sizes = sorted(len(m.recipients) for m in sink.messages)
            assert sizes == [1, 2, 2, 5]

    asyncio.run(main())
