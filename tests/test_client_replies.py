"""The client session and odd replies in a transaction: a refused MAIL followed by a lost
connection, 552 to RCPT, and positive replies that accepted no content. Driven by reply bytes,
no sockets (the sans-IO session of fastmta.protocol.client)."""

from __future__ import annotations

import pytest

from fastmta.protocol.client import (
    NO_RESPONSE,
    ClientSession,
    Failed,
    Message,
    Phase,
    Ready,
    TransactionResult,
)

BODY = b"Subject: x\r\n\r\nbody\r\n"
PIPELINING = b"250-mx\r\n250 PIPELINING\r\n"
CHUNKING = b"250-mx\r\n250-PIPELINING\r\n250 CHUNKING\r\n"


def ready(caps: bytes = PIPELINING, **kw) -> ClientSession:
    client = ClientSession("c.test", use_chunking=b"CHUNKING" in caps, **kw)
    client.receive(b"220 mx ESMTP\r\n" + caps)
    assert isinstance(client.next_event(), Ready)
    client.data_to_send()
    return client


def events(client: ClientSession) -> list:
    out = []
    for _ in range(10):
        ev = client.next_event()
        if ev is None:
            break
        out.append(ev)
    return out


# ------------------------------------------------------------------ refused MAIL, then the end


@pytest.mark.parametrize(
    "end",
    [b"421 4.7.0 too many errors\r\n", b"503 5.5.1 need RCPT\r\n", None],
    ids=["421-to-data", "503-to-data", "closed"],
)
def test_refused_mail_answers_every_recipient_whatever_ends_the_connection(end):
    """Pipelined MAIL gets 451, each RCPT "503 need MAIL"; the transaction's answer is the 451
    (transient), not the permanent 503 echoes, also when the connection ends before DATA's
    reply (RFC 2920 3.1: the RCPT replies after a failed MAIL say nothing of the recipients)."""
    client = ready()
    client.send(Message("a@b.test", ["r1@d.test", "r2@d.test"], BODY))
    client.data_to_send()
    client.receive(
        b"451 4.7.1 Greylisted\r\n503 5.5.1 need MAIL\r\n503 5.5.1 need MAIL\r\n" + (end or b"")
    )
    if end is None:
        client.connection_lost()
    result = events(client)[0]
    assert isinstance(result, TransactionResult)
    assert result.mail.code == 451
    assert [(r.code, r.enhanced) for r in result.rcpts] == [(451, "4.7.1")] * 2


def test_lost_after_rcpt_replies_keeps_the_rcpt_refusals():
    """MAIL accepted: a refused recipient keeps its own reply, an accepted one gets the loss."""
    client = ready()
    client.send(Message("a@b.test", ["r1@d.test", "r2@d.test"], BODY))
    client.receive(b"250 ok\r\n550 5.1.1 unknown\r\n250 ok\r\n")
    client.connection_lost()
    result = events(client)[0]
    assert [r.code for r in result.rcpts] == [550, NO_RESPONSE.code]
    assert result.rcpts[1] is NO_RESPONSE


# ------------------------------------------------------------------ 552 to RCPT


@pytest.mark.parametrize("pipelining", [True, False])
def test_552_to_rcpt_is_too_many_recipients_and_transient(pipelining):
    """RFC 5321 4.5.3.1.10: "clients SHOULD treat a 552 code in this case as a temporary ...
    failure". The recipients over the limit are deferred, the others delivered."""
    client = ready(use_pipelining=pipelining)
    client.send(Message("a@b.test", ["r1@d.test", "r2@d.test", "r3@d.test"], BODY))
    replies = [
        b"250 ok\r\n",
        b"250 ok\r\n",
        b"552 5.5.3 Error: too many recipients\r\n",
        b"552 too many recipients\r\n",
        b"354 go\r\n",
    ]
    if pipelining:
        client.receive(b"".join(replies))
    else:
        for r in replies:
            client.receive(r)
    assert client.data_to_send().endswith(BODY + b".\r\n")
    client.receive(b"250 2.0.0 queued\r\n")
    result = events(client)[0]
    assert [(r.code, r.enhanced) for r in result.rcpts] == [
        (250, "2.0.0"),
        (452, "4.5.3"),
        (452, "4.5.3"),
    ]
    assert result.rcpts[1].text == "Error: too many recipients"  # the server's words
    assert all(r.is_transient() for r in result.rcpts[1:])


def test_552_to_rcpt_with_another_meaning_stays_permanent():
    """Only "in this case": 552 5.2.2 (mailbox full) says what it means and stays 552."""
    client = ready()
    client.send(Message("a@b.test", ["r1@d.test"], BODY))
    client.receive(b"250 ok\r\n552 5.2.2 over quota\r\n554 5.5.1 no valid recipients\r\n")
    result = events(client)[0]
    assert [(r.code, r.enhanced) for r in result.rcpts] == [(552, "5.2.2")]


def test_552_to_rcpt_then_connection_lost_stays_transient():
    client = ready()
    client.send(Message("a@b.test", ["r1@d.test", "r2@d.test"], BODY))
    client.receive(b"250 ok\r\n250 ok\r\n552 5.5.3 too many recipients\r\n")
    client.connection_lost()
    result = events(client)[0]
    assert [r.code for r in result.rcpts] == [NO_RESPONSE.code, 452]


# ------------------------------------------------------------------ positive, but no content


def assert_protocol_error(client: ClientSession, *, n: int = 1) -> TransactionResult:
    """The transaction is deferred with 451 4.5.0 and the connection is not used again."""
    evs = events(client)
    result, failed = evs[0], evs[-1]
    assert isinstance(result, TransactionResult) and result.data is None
    assert all((r.code, r.enhanced) == (451, "4.5.0") for r in result.rcpts)
    assert len(result.rcpts) == n and "Unexpected reply" in result.rcpts[0].text
    assert isinstance(failed, Failed) and failed.reply.code == 451
    assert client.phase is Phase.CLOSED
    return result


@pytest.mark.parametrize("pipelining", [True, False])
@pytest.mark.parametrize("data_reply", [b"250 2.0.0 DATA ok\r\n", b"220 hi\r\n", b"334 what\r\n"])
def test_data_answered_other_than_354_is_not_delivered(pipelining, data_reply):
    """RFC 5321 4.3.2: DATA goes on only after 354; "250" to DATA accepted no content."""
    client = ready(use_pipelining=pipelining)
    client.send(Message("a@b.test", ["r1@d.test"], BODY))
    sent = client.data_to_send()
    for r in (b"250 ok\r\n", b"250 ok\r\n", data_reply):
        client.receive(r)
        sent += client.data_to_send()
    assert b"body" not in sent
    result = assert_protocol_error(client)
    assert str(result.rcpts[0]).endswith(data_reply.decode().strip())


@pytest.mark.parametrize("final", [b"354 what?\r\n", b"334 hm\r\n"])
def test_only_2xx_after_the_content_means_delivered(final):
    client = ready()
    client.send(Message("a@b.test", ["r1@d.test", "r2@d.test"], BODY))
    client.receive(b"250 ok\r\n250 ok\r\n550 5.1.1 unknown\r\n354 go\r\n")
    assert client.data_to_send().endswith(BODY + b".\r\n")
    client.receive(final)
    evs = events(client)
    result = evs[0]
    assert [r.code for r in result.rcpts] == [451, 550]
    assert isinstance(evs[-1], Failed) and client.phase is Phase.CLOSED


def test_only_2xx_to_bdat_last_means_delivered():
    client = ready(CHUNKING)
    client.send(Message("a@b.test", ["r1@d.test"], BODY))
    assert b"BDAT" in client.data_to_send()
    client.receive(b"250 ok\r\n250 ok\r\n354 what\r\n")
    assert_protocol_error(client)


def test_chained_final_3xx_fails_both_transactions_transiently():
    """A chained MAIL/RCPT/DATA went out with the "."; a 3xx to that "." leaves the replies
    out of step: the first is deferred, the second never answered (NO_RESPONSE)."""
    m = Message("a@b.test", ["r1@d.test"], BODY)
    client = ready()
    client.send(m)
    client.receive(b"250 ok\r\n250 ok\r\n354 go\r\n")
    assert client.can_chain
    client.send(m)
    client.receive(b"354 again\r\n250 ok\r\n250 ok\r\n354 go\r\n")
    first, second, failed = events(client)
    assert (first.rcpts[0].code, first.rcpts[0].enhanced) == (451, "4.5.0")
    assert second.rcpts == [NO_RESPONSE] and isinstance(failed, Failed)


def test_chained_data_answered_250_is_not_delivered():
    m = Message("a@b.test", ["r1@d.test"], BODY)
    client = ready()
    client.send(m)
    client.receive(b"250 ok\r\n250 ok\r\n354 go\r\n")
    client.send(m)
    client.data_to_send()
    client.receive(b"250 2.0.0 queued\r\n250 ok\r\n250 ok\r\n250 DATA ok\r\n")
    assert client.data_to_send() == b""  # no content after a 250 to DATA
    first, second, failed = events(client)
    assert first.rcpts[0].code == 250 and first.data.code == 250
    assert (second.rcpts[0].code, second.rcpts[0].enhanced) == (451, "4.5.0")
    assert isinstance(failed, Failed) and client.phase is Phase.CLOSED


def test_2xx_after_content_and_4xx_5xx_to_data_are_unchanged():
    client = ready()
    client.send(Message("a@b.test", ["r1@d.test"], BODY))
    client.receive(b"250 ok\r\n250 ok\r\n554 5.7.1 no\r\n")
    result = events(client)[0]
    assert result.rcpts[0].code == 554 and client.phase is Phase.IDLE
    client.send(Message("a@b.test", ["r1@d.test"], BODY))
    client.receive(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")  # RSET, MAIL, RCPT, DATA
    client.receive(b"250 2.0.0 queued\r\n")
    result = events(client)[0]
    assert result.rcpts[0].code == 250 and client.phase is Phase.IDLE
