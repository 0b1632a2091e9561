"""Relayhost with AUTH (delivery.relay_username/relay_password), against fastmta's own
submission listener as the smarthost: the right password delivers, a wrong one defers."""

from __future__ import annotations

import asyncio

import pytest
from delivery_harness import Harness

from fastmta.auth import set_password
from fastmta.spool import RcptState
from fastmta.testing.smtpd import ThreadedSmtpd


@pytest.fixture
def smarthost(tmp_path):
    users = tmp_path / "users"
    set_password(str(users), "relay", "s3cret")
    d = ThreadedSmtpd(
        str(tmp_path / "smarthost"),
        {
            "policy": {"users_file": str(users), "mynetworks": []},
            "listener": [{"address": "127.0.0.1:2525", "role": "submission", "auth": "always"}],
        },
    ).start()
    yield d
    d.stop()


@pytest.mark.parametrize("password, delivered", [("s3cret", True), ("wrong", False)])
def test_relayhost_auth(tmp_path, smarthost, password, delivered):
    async def main():
        overrides = {
            "delivery": {
                "relayhost": f"[127.0.0.1]:{smarthost.port}",
                "relay_username": "relay",
                "relay_password": password,
            }
        }
        async with Harness(tmp_path / "mta", {}, overrides=overrides, retry=30) as h:
            sm = await h.send("s@sender.test", ["r@far.test"])
            await h.until(lambda: sm.envelope.attempts >= 1, timeout=10)
            rc = sm.envelope.recipients[0]
            if delivered:
                assert rc.state == RcptState.DELIVERED
                (got,) = smarthost.submitted
                assert got.envelope.auth == "relay" and got.envelope.sender == "s@sender.test"
            else:
                assert rc.state == RcptState.DEFERRED and "4.7.0" in rc.last_reply
                assert not smarthost.submitted

    asyncio.run(main())
