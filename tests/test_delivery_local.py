"""Local domains go to Maildir (through the executor); unknown users bounce."""

from __future__ import annotations

import asyncio
import os

from delivery_harness import Harness

from fastmta.spool import RcptState


def test_local_maildir(tmp_path):
    async def main():
        h = Harness(tmp_path, overrides={
            "policy": {"local_domains": ["local.test"]},
            "local": {"maildir_root": str(tmp_path / "md"), "users": ["bob@local.test"]},
        })  # fmt: skip
        async with h:
            h.mx("sender.test", (10, "mx.sender.test", "127.0.0.2"))
            sm = await h.send("s@sender.test", ["bob+tag@local.test", "nobody@local.test"])
            sink = h.sinks["127.0.0.2"]
            await h.until(lambda: sink.count == 1)  # the DSN for nobody@
            await h.until(lambda: h.live(sm.envelope.id) is None)
            new = tmp_path / "md" / "local.test" / "bob" / "new"
            (name,) = os.listdir(new)
            content = (new / name).read_bytes()
            assert content.startswith(
                b"Return-Path: <s@sender.test>\nDelivered-To: bob+tag@local.test\n"
            )
            assert b"\nhello\n.dot line\n" in content
            states = [r.state for r in sm.envelope.recipients]
            assert states == [RcptState.DELIVERED, RcptState.BOUNCED]
            by = {r["recipient"]: r for r in h.records() if r["queue_id"] == sm.envelope.id}
            assert by["bob+tag@local.test"]["site"] == "local"
            assert by["bob+tag@local.test"]["outcome"] == "delivered"
            assert by["nobody@local.test"]["outcome"] == "bounced"
            assert by["nobody@local.test"]["enhanced"] == "5.1.1"
            assert b"nobody@local.test" in sink.messages[0].data

    asyncio.run(main())
