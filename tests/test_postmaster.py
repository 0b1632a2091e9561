"""RCPT TO:<postmaster> (RFC 5321 4.5.1: accepted from anyone, no domain) is stored as
postmaster@ the first local domain, or @ the server's hostname, and delivered as such (it used
to be routed to a "domain" named postmaster and bounce as NXDOMAIN)."""

from __future__ import annotations

import os
import smtplib
import time

import pytest
from e2e_harness import ServerProcess

from fastmta.delivery.maildir import MaildirDelivery

MSG = b"From: a@remote.test\r\nSubject: hi\r\n\r\nhello\r\n"


@pytest.mark.parametrize(
    "local_domains, stored",
    [(["Local.Test", "other.test"], "postmaster@Local.Test"), ([], "postmaster@mta.test")],
)
def test_postmaster_is_qualified(tmp_path, local_domains, stored):
    over = {"server": {"hold_delivery": True}, "policy": {"local_domains": local_domains}}
    with ServerProcess(tmp_path, over) as srv:
        with smtplib.SMTP(srv.host, srv.port, local_hostname="client.test", timeout=10) as smtp:
            smtp.ehlo()
            assert smtp.mail("a@remote.test")[0] == 250
            assert smtp.rcpt("postmaster")[0] == 250  # sent as RCPT TO:<postmaster>
            assert smtp.rcpt("u@elsewhere.test")[0] in (250, 554)
            assert smtp.data(MSG)[0] == 250
        srv.stop()
        [(env, _)] = srv.read_spool().values()
        assert env.recipients[0].address == stored


def test_postmaster_of_a_local_domain_is_accepted_and_delivered(tmp_path):
    """RFC 5321 4.5.1: postmaster@ every local domain is accepted (any case) even when [local]
    users lists the domain's users without it, and lands in the domain's "postmaster" Maildir
    (it used to be refused at RCPT; "<Postmaster>" got 250 and then bounced)."""
    over = {
        "server": {"hostname": "mx.local.test"},
        "policy": {"local_domains": ["local.test"]},
        "local": {"users": ["known@local.test"]},
    }
    with ServerProcess(tmp_path, over) as srv:
        with smtplib.SMTP(srv.host, srv.port, local_hostname="client.test", timeout=10) as smtp:
            for rcpt in ("postmaster@local.test", "Postmaster@LOCAL.test", "Postmaster"):
                assert smtp.sendmail("a@remote.test", [rcpt], MSG) == {}
            smtp.ehlo()
            assert smtp.mail("a@remote.test")[0] == 250
            assert smtp.rcpt("nobody@local.test")[0] == 550  # the others are still checked
        new = os.path.join(srv.maildir, "local.test", "postmaster", "new")
        deadline = time.monotonic() + 15
        while (
            time.monotonic() < deadline and len(os.listdir(new) if os.path.isdir(new) else ()) < 3
        ):
            time.sleep(0.1)
        assert len(os.listdir(new)) == 3


def test_maildir_postmaster_exemption():
    md = MaildirDelivery("/nonexistent", users={"local.test": {"known"}})
    assert md.check("PostMaster@Local.Test") is None
    assert md.maildir_path("postmaster+x@local.test") == "/nonexistent/local.test/postmaster"
    assert md.check("other@local.test")[0] == 550
    catch = MaildirDelivery("/nonexistent", users={"local.test": {"known"}}, catch_all="known")
    assert catch.maildir_path("postmaster@local.test") == "/nonexistent/local.test/known"
