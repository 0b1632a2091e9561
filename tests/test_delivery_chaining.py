"""Chained transactions (delivery.chain_transactions): with a backlog for a site, each next
message's MAIL/RCPT/DATA leave with the previous message's final dot. A server that drops
the connection before answering a chained transaction costs that message nothing: it goes
once more over a fresh connection (no deferral, no attempt counted), and the site stops
chaining."""

from __future__ import annotations

import asyncio

import pytest
from delivery_harness import Harness

from fastmta.protocol.replies import reply
from fastmta.testing.sink import Behaviour

N = 20
DATA_ONLY = Behaviour(chunking=False)  # with CHUNKING, BDAT carries each message in one write


@pytest.mark.parametrize("chain", [True, False])
def test_backlog_is_chained_over_one_connection(tmp_path, chain):
    async def main():
        overrides = {"delivery": {"max_connections_per_site": 1, "chain_transactions": chain}}
        async with Harness(tmp_path, {"127.0.0.2": DATA_ONLY}, overrides=overrides) as h:
            h.mx("example.test", (10, "mx1.example.test", "127.0.0.2"))
            for i in range(N):  # queued before the first connection is up: a backlog
                await h.send("a@sender.test", [f"u{i}@example.test"])
            sink = h.sinks["127.0.0.2"]
            await h.until(lambda: sink.count == N and len(h.spool) == 0)
            assert sorted(m.recipients[0] for m in sink.messages) == sorted(
                f"u{i}@example.test" for i in range(N)
            )
            st = h.engine.pool.stats
            assert st.connections_opened == 1 and st.reused == N - 1
            # every message after the first rides on its predecessor's dot, or none does
            assert st.chained == (N - 1 if chain else 0)
            assert h.engine.stats.chained == st.chained  # what `fastmta queue stats` shows
            recs = h.records()
            assert [r["outcome"] for r in recs] == ["delivered"] * N
            assert {r["attempt"] for r in recs} == {1}

    asyncio.run(main())


def test_server_dropping_a_chained_transaction(tmp_path):
    """The first message's dot gets 421 (the server closes): that message is deferred as the
    server said; the chained one was never answered, so it goes again at once over a new
    connection, counted as its first attempt, and the site sends no more chained ones."""
    refused = []

    def data_reply(msg):
        if b"Subject: drop" in msg.data and not refused:
            refused.append(msg)
            return reply(421, "4.3.2", "closing after this one")
        return None

    async def main():
        overrides = {"delivery": {"max_connections_per_site": 1}}
        sinks = {"127.0.0.2": Behaviour(chunking=False, data_reply=data_reply)}
        async with Harness(tmp_path, sinks, overrides=overrides, retry=0.3) as h:
            h.mx("example.test", (10, "mx1.example.test", "127.0.0.2"))
            drop = await h.send("a@sender.test", ["d@example.test"], b"Subject: drop\r\n\r\nx\r\n")
            rest = [await h.send("a@sender.test", [f"u{i}@example.test"]) for i in range(5)]
            sink = h.sinks["127.0.0.2"]
            await h.until(lambda: sink.count == 6 and len(h.spool) == 0)
            recs = h.records()
            by_id = {}
            for r in recs:
                by_id.setdefault(r["queue_id"], []).append((r["outcome"], r["attempt"]))
            assert by_id[drop.envelope.id] == [("deferred", 1), ("delivered", 2)]
            for sm in rest:  # the dropped chained one included: never deferred
                assert by_id[sm.envelope.id] == [("delivered", 1)]
            st = h.engine.pool.stats
            assert st.chained == 1  # only the one the server dropped; then the site stopped
            assert sink.connections >= 2

    asyncio.run(main())
