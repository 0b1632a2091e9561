"""STARTTLS policy: required and not offered -> deferred 4.7.5; offered -> delivered over TLS;
opportunistic uses it when offered."""

from __future__ import annotations

import asyncio

from delivery_harness import Harness

from fastmta.spool import RcptState
from fastmta.testing.sink import Behaviour


def test_required_without_starttls_deferred(tmp_path):
    async def main():
        h = Harness(tmp_path, retry=60, overrides={"delivery": {"tls": "required"}})
        async with h:
            h.mx("example.test", (10, "mx1.example.test", "127.0.0.2"))
            sm = await h.send("a@sender.test", ["b@example.test"])
            await h.until(lambda: h.engine.stats.deferred == 1)
            rc = sm.envelope.recipients[0]
            assert rc.state == RcptState.DEFERRED and rc.last_reply.startswith("451 4.7.5")
            assert h.sinks["127.0.0.2"].count == 0
            assert h.records()[0]["enhanced"] == "4.7.5"

    asyncio.run(main())


def test_required_with_starttls_delivered(tmp_path):
    async def main():
        h = Harness(tmp_path, {"127.0.0.2": Behaviour(starttls=True)},
                    overrides={"delivery": {"tls": "required"}})  # fmt: skip
        async with h:
            h.mx("example.test", (10, "mx1.example.test", "127.0.0.2"))
            sm = await h.send("a@sender.test", ["b@example.test"])
            sink = h.sinks["127.0.0.2"]
            await h.until(lambda: sink.count == 1)
            await h.until(lambda: h.live(sm.envelope.id) is None)
            assert sink.messages[0].tls
            assert h.records()[0]["tls"] is True

    asyncio.run(main())


def test_per_domain_required_and_opportunistic(tmp_path):
    async def main():
        h = Harness(tmp_path, {"127.0.0.2": Behaviour(starttls=True), "127.0.0.3": Behaviour()},
                    retry=60, overrides={"domain": {"strict.test": {"tls": "required"}}})  # fmt: skip
        async with h:
            h.mx("tls.test", (10, "mx.tls.test", "127.0.0.2"))
            h.mx("strict.test", (10, "mx.plain.test", "127.0.0.3"))
            h.mx("plain.test", (10, "mx.plain.test", "127.0.0.3"))
            await h.send("a@sender.test", ["x@tls.test", "y@strict.test", "z@plain.test"])
            await h.until(lambda: len(h.records()) == 3)
            by = {r["recipient"]: r for r in h.records()}
            assert by["x@tls.test"]["tls"] is True and by["x@tls.test"]["outcome"] == "delivered"
            assert (
                by["z@plain.test"]["tls"] is False and by["z@plain.test"]["outcome"] == "delivered"
            )
            assert by["y@strict.test"]["outcome"] == "deferred"
            assert by["y@strict.test"]["enhanced"] == "4.7.5"

    asyncio.run(main())
