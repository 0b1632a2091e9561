"""Embedding: MTA.submit() from Python code, delivered like mail received over SMTP; send()
waits for the outcomes; records() streams the delivery log."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from fastmta.api import MTA
from fastmta.protocol.replies import reply
from fastmta.testing.sink import Behaviour, Sink


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


def _config(tmp_path, sink=None, **server):
    return {
        "server": {"spool_dir": str(tmp_path / "spool"), "hostname": "embed.test", **server},
        "delivery": {"relayhost": f"[127.0.0.1]:{sink.port}" if sink else "[127.0.0.1]:9",
                     "idle_timeout": 1},
        "queue": {"retry_schedule": [60]},
    }  # fmt: skip


def test_send_waits_for_every_outcome(tmp_path):
    """send(): submit, then the final record of each recipient (after aliases)."""
    refuse = Behaviour(
        rcpt_reply=lambda a: reply(550, "5.1.1", "no") if a.startswith("x") else None
    )
    with Sink(behaviour=refuse) as sink:
        config = _config(tmp_path, sink)
        config["aliases"] = {"team@b.test": ["u@b.test", "x@b.test"]}

        async def main():
            async with MTA(config, listen=False) as mta:
                return await mta.send("app@a.test", ["team@b.test", "v@c.test"], b"Subject: s\n\nhi\n",
                                      timeout=20)  # fmt: skip

        results = asyncio.run(main())
    assert list(results) == ["u@b.test", "x@b.test", "v@c.test"]
    assert [(r.outcome, r.code) for r in results.values()] == [
        ("delivered", 250), ("bounced", 550), ("delivered", 250),
    ]  # fmt: skip
    assert results["u@b.test"].ip == "127.0.0.1" and results["x@b.test"].text == "no"


def test_send_times_out_and_the_message_stays_queued(tmp_path):
    later = Behaviour(rcpt_reply=lambda a: reply(451, "4.3.0", "later"))
    with Sink(behaviour=later) as sink:

        async def main():
            async with MTA(_config(tmp_path, sink), listen=False) as mta:
                with pytest.raises(TimeoutError):
                    await mta.send("app@a.test", ["u@b.test"], b"x\n", timeout=1)
                return mta.worker.engine.stats.queued

        assert asyncio.run(main()) == 1


def test_records_stream_and_deleted_outcome(tmp_path):
    """records(): reception and delivery records as they are written; an operator's delete
    is an outcome too ("deleted", like Postfix's "removed"); a slow reader loses the oldest."""

    async def main():
        async with MTA(_config(tmp_path, hold_delivery=True), listen=False) as mta:
            async with mta.records() as records:
                qid = await mta.submit("app@a.test", ["u@b.test", "w@b.test"], b"x\n")
                assert await mta.worker.engine.delete_message(qid)
                got = [await anext(records) for _ in range(3)]
            assert [anext_done async for anext_done in records] == []  # closed: ends
            small = mta.records(maxsize=1)
            await mta.submit("app@a.test", ["y@b.test"], b"x\n")
            await mta.submit("app@a.test", ["z@b.test"], b"x\n")
            last = await anext(small)
            small.close()
            return qid, got, last, small.dropped

    qid, got, last, dropped = asyncio.run(main())
    assert [(r.outcome, r.queue_id) for r in got] == [("received", qid)] + [("deleted", qid)] * 2
    assert [r.recipient for r in got[1:]] == ["u@b.test", "w@b.test"]
    assert last.recipients == ["z@b.test"] and dropped == 1
