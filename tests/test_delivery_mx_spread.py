"""MX hosts of equal preference share the load (RFC 5321 section 5.1: "randomize them to spread
the load"): the engine caches a domain's MX work for the TTL, but every job draws its own
order, and all of them stay one site (one connection pool, one set of limits)."""

from __future__ import annotations

import asyncio

from delivery_harness import Harness

from fastmta.testing.sink import Behaviour


def test_equal_preference_hosts_both_get_mail(tmp_path):
    async def main():
        sinks = {"127.0.0.2": Behaviour(), "127.0.0.3": Behaviour()}
        overrides = {"delivery": {"messages_per_connection": 1, "max_connections_per_site": 2}}
        async with Harness(tmp_path, sinks, overrides=overrides) as h:
            h.mx("eq.test", (10, "mx1.eq.test", "127.0.0.2"), (10, "mx2.eq.test", "127.0.0.3"))
            mx1, mx2 = h.sinks["127.0.0.2"], h.sinks["127.0.0.3"]
            keys = set()
            site = h.engine.pool.site

            def recording_site(key, *args):
                keys.add(key)
                return site(key, *args)

            h.engine.pool.site = recording_site
            for i in range(40):
                await h.send("s@sender.test", [f"u{i}@eq.test"])
                await asyncio.sleep(0.01)
            await h.until(lambda: mx1.count + mx2.count == 40)
            # one order for all would give 40/0; a fair draw gives fewer than 5 with p < 1e-6
            assert mx1.count >= 5 and mx2.count >= 5, (mx1.count, mx2.count)
            # the site is the MX set's, whatever the order: one pool for the domain
            assert len(keys) == 1 and "mx1.eq.test,mx2.eq.test" in keys.pop()

    asyncio.run(main())
