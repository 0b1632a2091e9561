"""server.soft_bounce (Postfix soft_bounce): while it is on nothing is refused or bounced for
good. The SMTP server answers 4xx where it would answer 5xx; a 5xx from a receiving server
defers the recipient (no DSN) and the next attempt after the setting is off bounces it."""

from __future__ import annotations

import asyncio
import smtplib

from delivery_harness import Harness

from fastmta.protocol.replies import reply, soften
from fastmta.spool import RcptState
from fastmta.testing.sink import Behaviour
from fastmta.testing.smtpd import ThreadedSmtpd


def test_soften():
    assert soften(reply(550, "5.1.1", "unknown")) == reply(450, "4.1.1", "unknown")
    assert soften(reply(554, None, "no")) == reply(454, None, "no")
    assert soften(reply(451, "4.3.0", "x")) == reply(451, "4.3.0", "x")
    assert soften(reply(250, "2.0.0", "ok")) == reply(250, "2.0.0", "ok")


def test_server_answers_4xx_instead_of_5xx(tmp_path):
    over = {
        "server": {"soft_bounce": True},
        "policy": {"mynetworks": ["192.0.2.0/24"], "local_domains": ["local.test"]},
        "local": {"users": ["alice@local.test"]},
    }
    d = ThreadedSmtpd(str(tmp_path / "spool"), over).start()
    try:
        with smtplib.SMTP("127.0.0.1", d.port, timeout=10) as c:
            c.ehlo("client.test")
            assert c.mail("a@sender.test")[0] == 250
            assert c.rcpt("b@elsewhere.test") == (454, b"4.7.1 Relay access denied")
            code, text = c.rcpt("nobody@local.test")
            assert (code, text[:6]) == (450, b"4.1.1 ")
            assert c.rcpt("alice@local.test")[0] == 250
            assert c.docmd("BOGUS")[0] == 400  # Postfix turns even this 500 into a 4xx
            assert c.data(b"Subject: x\r\n\r\nhi\r\n")[0] == 250
        assert len(d.submitted) == 1
    finally:
        d.stop()


def test_remote_5xx_defers_until_soft_bounce_is_off(tmp_path):
    async def main():
        refuse = Behaviour(rcpt_reply=lambda a: reply(550, "5.1.1", "no such user"))
        sinks = {"127.0.0.2": refuse, "127.0.0.3": Behaviour()}
        over = {"server": {"soft_bounce": True}}
        async with Harness(tmp_path, sinks, retry=0.3, overrides=over) as h:
            h.mx("example.test", (10, "mx1.example.test", "127.0.0.2"))
            h.mx("sender.test", (10, "mx.sender.test", "127.0.0.3"))
            sm = await h.send("s@sender.test", ["b@example.test"])
            await h.until(lambda: h.engine.stats.deferred >= 2)  # two attempts, both deferred
            env = h.live(sm.envelope.id).envelope
            assert env.recipients[0].state == RcptState.DEFERRED
            assert env.recipients[0].last_reply == "550 5.1.1 no such user"
            recs = [r for r in h.records() if r["queue_id"] == sm.envelope.id]
            assert {(r["outcome"], r["code"]) for r in recs} == {("deferred", 550)}
            assert h.sinks["127.0.0.3"].count == 0  # no DSN
            h.engine._soft_bounce = False  # what a reload with soft_bounce = false gives
            await h.until(lambda: h.live(sm.envelope.id) is None)
            assert env.recipients[0].state == RcptState.BOUNCED
            await h.until(lambda: h.sinks["127.0.0.3"].count == 1)  # the DSN

    asyncio.run(main())
