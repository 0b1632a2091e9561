"""End to end: the engine delivers spooled mail to a sink; connections are reused; domains
sharing an MX set are one site."""

from __future__ import annotations

import asyncio

from delivery_harness import BODY, Harness


def test_one_message_delivered(tmp_path):
    async def main():
        async with Harness(tmp_path) as h:
            h.mx("example.test", (10, "mx1.example.test", "127.0.0.2"))
            sm = await h.send("alice@sender.test", ["bob@example.test", "carol@example.test"])
            sink = h.sinks["127.0.0.2"]
            await h.until(lambda: sink.count == 1)
            await h.until(lambda: h.live(sm.envelope.id) is None)
            m = sink.messages[0]
            assert m.sender == "alice@sender.test"
            assert m.recipients == ["bob@example.test", "carol@example.test"]
            assert m.data == BODY.replace(b"\r\n..", b"\r\n.")
            assert m.helo == "mta.test"
            recs = h.records()
            assert sorted(r["recipient"] for r in recs) == [
                "bob@example.test",
                "carol@example.test",
            ]
            for r in recs:
                assert r["outcome"] == "delivered" and r["code"] == 250
                assert r["queue_id"] == sm.envelope.id and r["ip"] == "127.0.0.2"
                assert r["mx"] == "mx1.example.test" and r["attempt"] == 1
            assert h.engine.stats.delivered == 2

    asyncio.run(main())


def test_connection_reuse_100_messages(tmp_path):
    async def main():
        h = Harness(tmp_path, overrides={"delivery": {"max_connections_per_site": 3}})
        async with h:
            h.mx("example.test", (10, "mx1.example.test", "127.0.0.2"))
            for i in range(100):
                await h.send("a@sender.test", [f"u{i}@example.test"])
            sink = h.sinks["127.0.0.2"]
            await h.until(lambda: sink.count == 100)
            await h.until(lambda: len(h.spool) == 0)
            assert sink.connections <= 3
            st = h.engine.stats
            assert st.connections_opened <= 3 and st.reused >= 97
            assert st.delivered == 100 and st.in_memory == 0

    asyncio.run(main())


def test_idle_connection_reused_then_closed_after_idle_timeout(tmp_path):
    async def main():
        h = Harness(tmp_path, overrides={"delivery": {"idle_timeout": 0.3}})
        async with h:
            h.mx("example.test", (10, "mx1.example.test", "127.0.0.2"))
            sink = h.sinks["127.0.0.2"]
            await h.send("a@sender.test", ["u1@example.test"])
            await h.until(lambda: sink.count == 1)
            await asyncio.sleep(0.1)  # within idle_timeout: the warm connection is reused
            await h.send("a@sender.test", ["u2@example.test"])
            await h.until(lambda: sink.count == 2)
            assert sink.connections == 1 and len(h.engine.pool.sites) == 1
            await asyncio.sleep(0.6)  # past idle_timeout: QUIT, the next message reconnects
            assert h.engine.pool.sites == {}  # an idle site is forgotten (memory stays flat)
            await h.send("a@sender.test", ["u3@example.test"])
            await h.until(lambda: sink.count == 3)
            assert sink.connections == 2

    asyncio.run(main())


def test_ten_domains_one_site(tmp_path):
    async def main():
        h = Harness(tmp_path, overrides={"delivery": {"max_connections_per_site": 1}})
        async with h:
            for d in range(10):
                h.mx(f"d{d}.test", (10, "mx.shared.test", "127.0.0.2"))
            await h.send("a@sender.test", [f"x@d{d}.test" for d in range(10)])
            sink = h.sinks["127.0.0.2"]
            await h.until(lambda: sink.count == 10)
            assert sink.connections == 1
            assert len(h.engine.pool.sites) == 1
            assert len({r["site"] for r in h.records()}) == 1

    asyncio.run(main())


def test_recipients_per_transaction(tmp_path):
    async def main():
        h = Harness(tmp_path, overrides={"queue": {"recipients_per_transaction": 2}})
        async with h:
            h.mx("example.test", (10, "mx1.example.test", "127.0.0.2"))
            sm = await h.send("a@sender.test", [f"u{i}@example.test" for i in range(5)])
            sink = h.sinks["127.0.0.2"]
            await h.until(lambda: sink.count == 3)
            assert sorted(len(m.recipients) for m in sink.messages) == [1, 2, 2]
            await h.until(lambda: h.live(sm.envelope.id) is None)

    asyncio.run(main())


def test_hold_and_release(tmp_path):
    async def main():
        h = Harness(tmp_path, overrides={"server": {"hold_delivery": True}})
        async with h:
            h.mx("example.test", (10, "mx1.example.test", "127.0.0.2"))
            await h.send("a@sender.test", ["b@example.test"])
            await asyncio.sleep(0.2)
            sink = h.sinks["127.0.0.2"]
            assert sink.count == 0 and h.engine.stats.queued == 1
            h.engine.hold = False
            await h.until(lambda: sink.count == 1)

    asyncio.run(main())


def test_recovered_messages_are_delivered(tmp_path):
    async def main():
        h = Harness(tmp_path, overrides={"server": {"hold_delivery": True}})
        h.start_servers()
        try:
            h.mx("example.test", (10, "mx1.example.test", "127.0.0.2"))
            await h.open()
            sm = await h.send("a@sender.test", ["b@example.test"])
            await h.close()
            h.overrides = {}
            await h.open()
            sink = h.sinks["127.0.0.2"]
            await h.until(lambda: sink.count == 1)
            await h.until(lambda: h.live(sm.envelope.id) is None)
            assert h.spool.get(sm.envelope.id) is None
            await h.close()
        finally:
            h.stop_servers()

    asyncio.run(main())


def test_in_memory_cap_holds(tmp_path):
    async def main():
        h = Harness(tmp_path, overrides={"queue": {"max_in_memory": 5}})
        async with h:
            h.mx("example.test", (10, "mx1.example.test", "127.0.0.2"))
            h.engine.hold = True
            for i in range(60):
                await h.send("a@sender.test", [f"u{i}@example.test"])
            peak = 0
            h.engine.hold = False
            while len(h.spool):
                peak = max(peak, h.engine.stats.in_memory)
                await asyncio.sleep(0)
            assert 1 <= peak <= 5
            assert h.sinks["127.0.0.2"].count == 60

    asyncio.run(main())


def test_stop_with_mail_in_flight_keeps_it_queued(tmp_path):
    async def main():
        from fastmta.testing.sink import Behaviour

        h = Harness(tmp_path, {"127.0.0.2": Behaviour(delay=0.3)})
        async with h:
            h.mx("example.test", (10, "mx1.example.test", "127.0.0.2"))
            for i in range(5):
                await h.send("a@sender.test", [f"u{i}@example.test"])
            await asyncio.sleep(0.05)
        # stop() waited for the transactions in flight; whatever was not delivered is still
        # in the spool (reopen it and count)
        delivered = h.sinks["127.0.0.2"].count
        from fastmta.spool import Spool

        sp = Spool(h.config.server.spool_dir, fsync=False)
        left = await sp.open()
        await sp.close()
        assert len(left) + delivered == 5

    asyncio.run(main())
