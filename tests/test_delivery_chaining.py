"""Chained transactions (delivery.chain_transactions): with a backlog for a site, each next
message's MAIL/RCPT/DATA leave with the previous message's final dot. A server that drops
the connection before answering a chained transaction costs that message nothing: it goes
once more over a fresh connection (no deferral, no attempt counted), and the site stops
chaining."""

from __future__ import annotations

import asyncio
import logging

import pytest
from delivery_harness import Harness

from fastmta.protocol.replies import reply
from fastmta.testing.sink import Behaviour

N = 20
DATA_ONLY = Behaviour(chunking=False)  # with CHUNKING, BDAT carries each message in one write


async def queued_burst(h: Harness, n: int, prefix: str = "u") -> list:
    """``n`` one-recipient messages to example.test queued while delivery is held, then let go
    at once: the site's queue has them all before its first connection."""
    h.engine.hold = True
    sent = [await h.send("a@sender.test", [f"{prefix}{i}@example.test"]) for i in range(n)]
    h.engine.hold = False
    return sent


async def all_delivered(h: Harness, n: int, timeout: float = 10.0):
    """Wait until the sink on 127.0.0.2 has ``n`` messages and the spool is empty."""
    sink = h.sinks["127.0.0.2"]
    await h.until(lambda: sink.count == n and len(h.spool) == 0, timeout)
    return sink


@pytest.mark.parametrize("chain", [True, False])
def test_backlog_is_chained_over_one_connection(tmp_path, chain):
    async def main():
        overrides = {"delivery": {"max_connections_per_site": 1, "chain_transactions": chain}}
        async with Harness(tmp_path, {"127.0.0.2": DATA_ONLY}, overrides=overrides) as h:
            h.mx("example.test", (10, "mx1.example.test", "127.0.0.2"))
            await queued_burst(h, N)
            sink = await all_delivered(h, N)
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


def test_big_messages_chained_over_tls(tmp_path):
    """Chaining under STARTTLS with messages far bigger than a socket buffer (the transport
    pauses writing): each arrives whole, in order of the queue, byte for byte."""
    line = b"0123456789" * 9 + b"\r\n"
    bodies = [b"Subject: big %d\r\n\r\n" % i + line * 3000 for i in range(6)]  # ~300 KB each

    async def main():
        overrides = {"delivery": {"max_connections_per_site": 1, "tls": "required"}}
        sinks = {"127.0.0.2": Behaviour(chunking=False, starttls=True)}
        async with Harness(tmp_path, sinks, overrides=overrides) as h:
            h.mx("example.test", (10, "mx1.example.test", "127.0.0.2"))
            h.engine.hold = True
            for i, body in enumerate(bodies):
                await h.send("a@sender.test", [f"u{i}@example.test"], body)
            h.engine.hold = False
            sink = await all_delivered(h, 6, 20)
            got = sorted(sink.messages, key=lambda m: m.recipients[0])
            for i, m in enumerate(got):
                assert m.tls and m.data.endswith(bodies[i]), i
            assert h.engine.pool.stats.chained == 5

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
            h.engine.hold = True
            drop = await h.send("a@sender.test", ["d@example.test"], b"Subject: drop\r\n\r\nx\r\n")
            rest = [await h.send("a@sender.test", [f"u{i}@example.test"]) for i in range(5)]
            h.engine.hold = False
            sink = await all_delivered(h, 6)
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


def test_stalled_server_times_out_the_chained_transactions_too(tmp_path):
    """The server never answers the first message's dot: after data_done_timeout it is
    deferred; the one chained behind it was never answered, so it goes once more over a new
    connection (not chained: the site stopped), where it stalls and is deferred in turn."""

    async def main():
        overrides = {"delivery": {"max_connections_per_site": 1, "data_done_timeout": 0.5}}
        sinks = {"127.0.0.2": Behaviour(chunking=False, stall_after_data=True)}
        async with Harness(tmp_path, sinks, overrides=overrides, retry=3600) as h:
            h.mx("example.test", (10, "mx1.example.test", "127.0.0.2"))
            await queued_burst(h, 2)
            await h.until(lambda: h.engine.stats.deferred == 2)
            recs = h.records()
            assert [(r["outcome"], r["code"], r["attempt"]) for r in recs] == [
                ("deferred", 451, 1)
            ] * 2
            assert all("Timeout waiting for the data_done reply" in r["text"] for r in recs)
            st = h.engine.pool.stats
            assert st.chained == 1 and st.connections_opened == 2 and len(h.spool) == 2

    asyncio.run(main())


def test_server_losing_commands_pipelined_after_the_dot(tmp_path, caplog):
    """A server that drops what follows the final dot never answers the chained MAIL: after
    mail_timeout that message goes once more over a new connection, the site stops chaining,
    and every message is delivered at its first attempt."""

    async def main():
        overrides = {"delivery": {"max_connections_per_site": 1, "mail_timeout": 0.5}}
        sinks = {"127.0.0.2": Behaviour(chunking=False, drop_after_dot=True)}
        async with Harness(tmp_path, sinks, overrides=overrides) as h:
            h.mx("example.test", (10, "mx1.example.test", "127.0.0.2"))
            await queued_burst(h, 5)
            await all_delivered(h, 5)
            recs = h.records()
            assert [(r["outcome"], r["attempt"]) for r in recs] == [("delivered", 1)] * 5
            st = h.engine.pool.stats
            assert st.chained == 1 and st.connections_opened == 2

    with caplog.at_level(logging.WARNING, logger="fastmta.delivery"):
        asyncio.run(main())
    assert caplog.text.count("no more chained transactions to it") == 1


def test_a_worker_bug_sends_its_chained_jobs_again(tmp_path, monkeypatch):
    """on_result failing for one job (a bug) must not strand the jobs chained behind it: they
    are queued again and delivered (at least once)."""

    async def main():
        overrides = {"delivery": {"max_connections_per_site": 1}}
        async with Harness(tmp_path, {"127.0.0.2": DATA_ONLY}, overrides=overrides) as h:
            h.mx("example.test", (10, "mx1.example.test", "127.0.0.2"))
            pool = h.engine.pool
            real = pool.on_result
            calls = []

            async def flaky(job, replies, info):
                calls.append(job)
                if len(calls) == 1:
                    raise RuntimeError("bug")
                await real(job, replies, info)

            monkeypatch.setattr(pool, "on_result", flaky)
            sms = await queued_burst(h, 4)
            await h.until(lambda: len(h.spool) == 1)  # all but the one whose result was lost
            assert h.live(sms[0].envelope.id) is not None
            assert pool.stats.chained >= 1

    asyncio.run(main())


def test_per_domain_override(tmp_path):
    """[domain."x"] chain_transactions overrides [delivery] for that domain's own site."""

    async def main():
        overrides = {
            "delivery": {"max_connections_per_site": 1, "chain_transactions": False},
            "domain": {"chained.test": {"chain_transactions": True}},
        }
        sinks = {"127.0.0.2": DATA_ONLY, "127.0.0.3": DATA_ONLY}
        async with Harness(tmp_path, sinks, overrides=overrides) as h:
            h.mx("plain.test", (10, "mx.plain.test", "127.0.0.2"))
            h.mx("chained.test", (10, "mx.chained.test", "127.0.0.3"))
            h.engine.hold = True
            for i in range(5):
                await h.send("a@sender.test", [f"u{i}@plain.test"])
                await h.send("a@sender.test", [f"u{i}@chained.test"])
            h.engine.hold = False
            await h.until(lambda: len(h.spool) == 0)
            assert h.sinks["127.0.0.2"].count == 5 and h.sinks["127.0.0.3"].count == 5
            assert h.engine.pool.stats.chained == 4  # only chained.test's backlog

    asyncio.run(main())


def test_cached_connection_gone_silent(tmp_path):
    """A cached connection whose server stopped answering (no close: a NAT that forgot it):
    the next message's MAIL times out and it goes once more over a fresh connection, as a
    closed cached connection would; it is not deferred."""

    async def main():
        overrides = {"delivery": {"max_connections_per_site": 1, "mail_timeout": 0.5}}
        sinks = {"127.0.0.2": Behaviour(silent_after=1)}
        async with Harness(tmp_path, sinks, overrides=overrides) as h:
            h.mx("example.test", (10, "mx1.example.test", "127.0.0.2"))
            sink = h.sinks["127.0.0.2"]
            await h.send("a@sender.test", ["u1@example.test"])
            await h.until(lambda: sink.count == 1 and len(h.spool) == 0)
            await h.send("a@sender.test", ["u2@example.test"])  # over the cached connection
            await h.until(lambda: sink.count == 2 and len(h.spool) == 0)
            recs = h.records()
            assert [(r["outcome"], r["attempt"]) for r in recs] == [("delivered", 1)] * 2
            st = h.engine.pool.stats
            assert st.connections_opened == 2 and st.reused == 1 and st.chained == 0

    asyncio.run(main())


@pytest.mark.parametrize("backlog, connections", [(4, 5), (1, N)])
def test_a_burst_rides_few_connections(tmp_path, backlog, connections):
    """delivery.backlog_per_connection: a burst of N queued messages waits for the workers at
    work (up to ``backlog`` per worker, chained) before another connection opens; 1 spreads
    it over a connection each, up to max_connections_per_site."""

    async def main():
        overrides = {"delivery": {"max_connections_per_site": N, "backlog_per_connection": backlog}}
        async with Harness(tmp_path, {"127.0.0.2": DATA_ONLY}, overrides=overrides) as h:
            h.mx("example.test", (10, "mx1.example.test", "127.0.0.2"))
            await queued_burst(h, N)
            await all_delivered(h, N)
            st = h.engine.pool.stats
            # N jobs at once: a new worker for each ``backlog`` of them (the first included)
            assert st.connections_opened == connections
            assert st.chained == N - connections  # each worker's later jobs all chained
            assert [r["outcome"] for r in h.records()] == ["delivered"] * N

    asyncio.run(main())


def test_once_a_site_proves_fast_a_burst_rides_one_connection(tmp_path):
    """delivery.chain_wait: the backlog a working connection takes is what it sends within
    chain_wait at the site's measured transaction time (up to backlog_per_connection, 32).
    Unknown at first (4 per connection: 5 connections for the first burst); after that, fast
    transactions let a whole burst wait for the one connection woken and ride it chained."""

    async def main():
        overrides = {"delivery": {"max_connections_per_site": N, "chain_wait": "1s"}}
        async with Harness(tmp_path, {"127.0.0.2": DATA_ONLY}, overrides=overrides) as h:
            h.mx("example.test", (10, "mx1.example.test", "127.0.0.2"))
            await queued_burst(h, N, "first")
            sink = await all_delivered(h, N)
            st = h.engine.pool.stats
            assert st.connections_opened == 5 and st.chained == N - 5
            await queued_burst(h, N, "second")
            await all_delivered(h, 2 * N)
            assert st.connections_opened == 5  # idle ones woken, none opened
            assert st.chained == (N - 5) + (N - 1)  # all but the second burst's first
            peers = {m.peer for m in sink.messages if m.recipients[0].startswith("second")}
            assert len(peers) == 1

    asyncio.run(main())


def test_a_slow_site_gets_a_connection_per_queued_message(tmp_path):
    """A site whose transactions take longer than chain_wait (default 50 ms) keeps no backlog
    per connection: once its results show it, a burst gets a connection per queued message up
    to max_connections_per_site (Postfix's way) rather than wait to be chained."""

    async def main():
        overrides = {"delivery": {"max_connections_per_site": N}}
        sinks = {"127.0.0.2": Behaviour(chunking=False, delay=0.05)}  # 100 ms a transaction
        async with Harness(tmp_path, sinks, overrides=overrides) as h:
            h.mx("example.test", (10, "mx1.example.test", "127.0.0.2"))
            await queued_burst(h, N, "first")
            await all_delivered(h, N)
            st = h.engine.pool.stats
            # 4 queued per connection while the time is unknown (5), a few more once it shows
            assert 5 <= st.connections_opened < N
            site = next(iter(h.engine.pool.sites.values()))
            assert site.tx_time >= 0.1
            chained = st.chained
            await queued_burst(h, N, "second")
            await all_delivered(h, 2 * N)
            assert st.connections_opened == N  # the idle ones woken, and more up to the limit
            assert st.chained == chained  # none waited to be chained

    asyncio.run(main())


def test_a_server_without_pipelining_gets_the_burst_spread(tmp_path):
    """No PIPELINING, no chaining: once the first connection shows it, the queued burst no
    longer waits for busy workers but gets connections of its own."""

    async def main():
        overrides = {"delivery": {"max_connections_per_site": N}}
        sinks = {"127.0.0.2": Behaviour(chunking=False, pipelining=False)}
        async with Harness(tmp_path, sinks, overrides=overrides) as h:
            h.mx("example.test", (10, "mx1.example.test", "127.0.0.2"))
            await queued_burst(h, N)
            await all_delivered(h, N)
            st = h.engine.pool.stats
            assert st.chained == 0
            assert st.connections_opened > N // 4 + 1  # more than the chaining bound (5)

    asyncio.run(main())


def test_a_trickle_reuses_the_most_recently_idle_connection(tmp_path):
    """After a burst spread over several connections, messages one at a time all go over the
    most recently idle one, so the burst's surplus connections sit idle and time out (waking
    the longest idle would rotate through all of them and keep them alive)."""

    async def main():
        overrides = {"delivery": {"max_connections_per_site": 5, "backlog_per_connection": 1}}
        async with Harness(tmp_path, {"127.0.0.2": DATA_ONLY}, overrides=overrides) as h:
            h.mx("example.test", (10, "mx1.example.test", "127.0.0.2"))
            await queued_burst(h, 5, "burst")
            sink = await all_delivered(h, 5)
            assert h.engine.pool.stats.connections_opened == 5
            for i in range(6):
                await h.send("a@sender.test", [f"trickle{i}@example.test"])
                await h.until(lambda: len(h.spool) == 0)
            trickle = [m.peer for m in sink.messages if m.recipients[0].startswith("trickle")]
            assert len(trickle) == 6 and len(set(trickle)) == 1
            assert h.engine.pool.stats.connections_opened == 5

    asyncio.run(main())
