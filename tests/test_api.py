"""Embedding: MTA.submit() from Python code, delivered like mail received over SMTP."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from fastmta.api import MTA
from fastmta.testing.sink import Sink


def test_submit_is_durable_and_delivered(tmp_path):
    with Sink() as sink:
        config = {
            "server": {"spool_dir": str(tmp_path / "spool"), "hostname": "embed.test"},
            "delivery": {"relayhost": f"[127.0.0.1]:{sink.port}"},
        }

        async def main():
            async with MTA(config, listen=False) as mta:
                qid = await mta.submit(
                    "app@a.test", ["u@b.test", "v@c.test"], b"Subject: hi\n\n.dot\n"
                )
                assert len(qid) == 24
                for _ in range(200):
                    if sink.count == 2:  # one transaction per recipient domain
                        break
                    await asyncio.sleep(0.02)

        asyncio.run(main())
        msgs = sink.messages
        assert sorted(r for m in msgs for r in m.recipients) == ["u@b.test", "v@c.test"]
        for m in msgs:
            assert m.sender == "app@a.test"
            assert m.data == b"Subject: hi\r\n\r\n.dot\r\n"  # CRLF, dot-stuffed on the wire
        with open(tmp_path / "spool" / "delivery.log", "rb") as f:
            lines = [msgspec.json.decode(line) for line in f]
        (got,) = [r for r in lines if r["outcome"] == "received"]
        assert (got["via"], got["client"], got["recipients"]) == (
            "api",
            "api",
            ["u@b.test", "v@c.test"],
        )
        assert {r["outcome"] for r in lines if r is not got} == {"delivered"}


def test_submit_refuses_bad_addresses(tmp_path):
    async def main():
        config = {"server": {"spool_dir": str(tmp_path / "spool"), "hold_delivery": True}}
        async with MTA(config, listen=False) as mta:
            with pytest.raises(ValueError, match="501 5.1.3"):
                await mta.submit("a@b.test", ["not an address"], b"x\n")
            with pytest.raises(ValueError, match="no recipients"):
                await mta.submit("a@b.test", [], b"x\n")
            assert mta.worker.engine.stats.queued == 0

    asyncio.run(main())
