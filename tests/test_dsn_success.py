"""NOTIFY=SUCCESS (RFC 3461 section 5.2): after final delivery a "delivered" DSN goes to the
sender for a recipient delivered here (Maildir), a "relayed" one when the next hop does not
offer DSN; a next hop that offers it gets NOTIFY and makes the notice itself. Never for the
null sender, never without SUCCESS in NOTIFY."""

from __future__ import annotations

import asyncio

import pytest
from delivery_harness import Harness

from fastmta.delivery.bounce import wants_notice
from fastmta.delivery.dsn import FailedRecipient, build_dsn
from fastmta.spool import Recipient
from fastmta.testing.sink import Behaviour

LOCAL = {"policy": {"local_domains": ["loc.test"]}}
ORIGINAL = b"Subject: hi\r\nFrom: s@sender.test\r\n\r\nsecret body\r\n"


def test_wants_notice_success_only_when_asked():
    assert not wants_notice(None, "success")  # no NOTIFY: FAILURE,DELAY (RFC 3461 4.1)
    assert not wants_notice("FAILURE,DELAY", "success")
    assert not wants_notice("NEVER", "success")
    assert wants_notice("success,failure", "success")
    assert wants_notice(None, "failure") and not wants_notice("SUCCESS", "failure")


def test_build_success_dsn_returns_headers_only():
    r = FailedRecipient("u@loc.test", action="delivered", status="2.0.0", diagnostic="250 ok")
    wire = build_dsn(
        reporting_mta="mta.test",
        envelope_id=None,
        original_sender="s@sender.test",
        arrival=1_700_000_000.0,
        recipients=[r],
        original=ORIGINAL,
        ret="FULL",  # RFC 3461 4.3: the content only in "failed" DSNs
        kind="success",
    )
    assert b"Subject: Successful Mail Delivery Report" in wire
    assert b"Action: delivered" in wire and b"Status: 2.0.0" in wire
    assert b"text/rfc822-headers" in wire and b"Subject: hi" in wire
    assert b"secret body" not in wire and b"Will-Retry-Until" not in wire


@pytest.mark.parametrize("notify", ["SUCCESS", "SUCCESS,FAILURE"])
def test_local_delivery_with_notify_success_gets_a_delivered_dsn(tmp_path, notify):
    async def main():
        async with Harness(tmp_path, {"127.0.0.3": Behaviour()}, overrides=LOCAL) as h:
            h.mx("sender.test", (10, "mx.sender.test", "127.0.0.3"))
            rcpts = [Recipient("u@loc.test", notify=notify), "v@loc.test"]
            sm = await h.send("s@sender.test", rcpts, ORIGINAL, ret="FULL")
            sink = h.sinks["127.0.0.3"]
            await h.until(lambda: h.live(sm.envelope.id) is None and sink.count == 1)
            dsn = sink.messages[0]
            assert dsn.sender == "" and dsn.recipients == ["s@sender.test"]
            assert b"Subject: Successful Mail Delivery Report" in dsn.data
            assert b"Final-Recipient: rfc822; u@loc.test" in dsn.data
            assert b"Action: delivered" in dsn.data and b"Status: 2.0.0" in dsn.data
            assert b"v@loc.test" not in dsn.data  # no NOTIFY: no success notice
            assert b"secret body" not in dsn.data
            await asyncio.sleep(0.3)
            assert sink.count == 1 and h.engine.stats.dsns == 1

    asyncio.run(main())


def test_no_success_dsn_without_notify_success_or_for_the_null_sender(tmp_path):
    async def main():
        async with Harness(tmp_path, {"127.0.0.3": Behaviour()}, overrides=LOCAL) as h:
            h.mx("sender.test", (10, "mx.sender.test", "127.0.0.3"))
            a = await h.send("s@sender.test", [Recipient("u@loc.test", notify="FAILURE")])
            b = await h.send("", [Recipient("u@loc.test", notify="SUCCESS")])
            await h.until(lambda: h.live(a.envelope.id) is None and h.live(b.envelope.id) is None)
            await asyncio.sleep(0.3)
            assert h.sinks["127.0.0.3"].count == 0 and h.engine.stats.dsns == 0

    asyncio.run(main())


def test_relayed_to_a_next_hop_with_dsn_passes_notify_on(tmp_path):
    async def main():
        sinks = {"127.0.0.2": Behaviour(), "127.0.0.3": Behaviour()}
        async with Harness(tmp_path, sinks) as h:
            h.mx("ex.test", (10, "mx.ex.test", "127.0.0.2"))
            h.mx("sender.test", (10, "mx.sender.test", "127.0.0.3"))
            await h.send("s@sender.test", [Recipient("b@ex.test", notify="SUCCESS")], ret="HDRS")
            await h.until(lambda: h.sinks["127.0.0.2"].count == 1)
            assert h.sinks["127.0.0.2"].messages[0].mail_params.ret == "HDRS"  # DSN offered
            await asyncio.sleep(0.3)
            assert h.sinks["127.0.0.3"].count == 0  # the next hop's notice, not ours

    asyncio.run(main())


def test_relayed_to_a_next_hop_without_dsn_gets_a_relayed_dsn(tmp_path):
    async def main():
        sinks = {"127.0.0.2": Behaviour(dsn=False), "127.0.0.3": Behaviour()}
        async with Harness(tmp_path, sinks) as h:
            h.mx("ex.test", (10, "mx.ex.test", "127.0.0.2"))
            h.mx("sender.test", (10, "mx.sender.test", "127.0.0.3"))
            await h.send("s@sender.test", [Recipient("b@ex.test", notify="SUCCESS")], ret="HDRS")
            await h.until(lambda: h.sinks["127.0.0.3"].count == 1)
            data = h.sinks["127.0.0.3"].messages[0].data
            assert b"Action: relayed" in data and b"Status: 2.0.0" in data
            assert b"Remote-MTA: dns; mx.ex.test" in data
            assert h.sinks["127.0.0.2"].messages[0].mail_params.ret is None  # not passed on

    asyncio.run(main())
