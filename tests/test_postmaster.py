"""RCPT TO:<postmaster> (RFC 5321 4.5.1: accepted from anyone, no domain) is stored as
postmaster@ the first local domain, or @ the server's hostname, and delivered as such (it used
to be routed to a "domain" named postmaster and bounce as NXDOMAIN)."""

from __future__ import annotations

import smtplib

import pytest
from e2e_harness import ServerProcess

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
