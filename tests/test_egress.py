"""Egress sources ([[egress]]): the weighted turn, and delivery from several local addresses
(each with its EHLO name, its own connections, and the source in the delivery log)."""

from __future__ import annotations

import asyncio
import collections

import pytest
from delivery_harness import Harness

from fastmta.config import ConfigError, load_config
from fastmta.delivery.egress import EgressPool, Source
from fastmta.testing.sink import Behaviour


def test_smooth_weighted_turn():
    pool = EgressPool([Source("10.0.0.1", "a", 2), Source("10.0.0.2", "b", 1)])
    picks = [pool.next().helo_name for _ in range(9)]
    assert picks == ["a", "b", "a"] * 3  # 2:1, never two b in a row, no burst of a
    single = EgressPool([Source(None, "mta.test")])
    assert single.next() is single.next() and not single.tagged
    assert single.site_key("mx.test:25/none", single.next()) == "mx.test:25/none"
    assert pool.site_key("mx.test:25/none", pool.sources[1]) == "mx.test:25/none@10.0.0.2"


@pytest.mark.parametrize(
    "egress, error",
    [
        ([{"helo_name": "x"}], "egress[0].address"),
        ([{"address": "not-an-ip"}], "egress[0].address"),
        ([{"address": "127.0.0.5"}, {"address": "127.0.0.5"}], "egress[1].address"),
        ([{"address": "127.0.0.5", "weight": 0}], "egress[0].weight"),
    ],
)
def test_bad_egress_config(egress, error):
    with pytest.raises(ConfigError, match=error.replace("[", r"\[").replace("]", r"\]")):
        load_config(None, {"egress": egress})
    with pytest.raises(ConfigError, match="delivery.source_address"):
        load_config(
            None,
            {"egress": [{"address": "127.0.0.5"}], "delivery": {"source_address": "127.0.0.6"}},
        )


def test_delivery_from_each_source_with_its_ehlo_name(tmp_path):
    async def main():
        overrides = {
            "egress": [
                {"address": "127.0.0.5", "helo_name": "out5.example.test", "weight": 2},
                {"address": "127.0.0.6", "helo_name": "out6.example.test"},
            ]
        }
        async with Harness(tmp_path, {"127.0.0.2": Behaviour()}, overrides=overrides) as h:
            h.mx("example.test", (10, "mx1.example.test", "127.0.0.2"))
            for i in range(9):
                await h.send("a@sender.test", [f"u{i}@example.test"])
            sink = h.sinks["127.0.0.2"]
            await h.until(lambda: sink.count == 9 and len(h.spool) == 0)
            by_source = collections.Counter(
                (m.peer.rsplit(":", 1)[0], m.helo) for m in sink.messages
            )
            assert by_source == {
                ("127.0.0.5", "out5.example.test"): 6,
                ("127.0.0.6", "out6.example.test"): 3,
            }
            logged = collections.Counter(r["source"] for r in h.records())
            assert logged == {"127.0.0.5": 6, "127.0.0.6": 3}
            # each source has its own connections to the site
            assert len({k for k in h.engine.pool.sites if k.endswith("@127.0.0.5")}) == 1
            assert len({k for k in h.engine.pool.sites if k.endswith("@127.0.0.6")}) == 1

    asyncio.run(main())


def test_a_domain_can_be_sent_from_some_sources_only(tmp_path):
    async def main():
        overrides = {
            "egress": [{"address": "127.0.0.5"}, {"address": "127.0.0.6"}],
            "domain": {"example.test": {"egress": ["127.0.0.6"]}},
        }
        sinks = {"127.0.0.2": Behaviour(), "127.0.0.3": Behaviour()}
        async with Harness(tmp_path, sinks, overrides=overrides) as h:
            h.mx("example.test", (10, "mx1.example.test", "127.0.0.2"))
            h.mx("other.test", (10, "mx1.other.test", "127.0.0.3"))
            for i in range(4):
                await h.send("a@sender.test", [f"u{i}@example.test", f"u{i}@other.test"])
            a, b = h.sinks["127.0.0.2"], h.sinks["127.0.0.3"]
            await h.until(lambda: a.count == 4 and b.count == 4 and len(h.spool) == 0)
            assert {m.peer.rsplit(":", 1)[0] for m in a.messages} == {"127.0.0.6"}
            assert {m.peer.rsplit(":", 1)[0] for m in b.messages} == {"127.0.0.5", "127.0.0.6"}

    asyncio.run(main())


def test_a_domain_egress_list_names_configured_sources():
    with pytest.raises(ConfigError, match=r'domain\."x.test"\.egress'):
        load_config(
            None,
            {"egress": [{"address": "127.0.0.5"}], "domain": {"x.test": {"egress": ["10.9.9.9"]}}},
        )
