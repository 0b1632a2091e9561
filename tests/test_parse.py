"""The SMTP parser, run on both implementations (fixture ``impl``: "c" and "py"), with every
input fed whole and split at every byte position."""

from __future__ import annotations

import pytest

from fastmta.protocol.errors import MailFrom, ParseError, RcptTo
from fastmta.protocol.replies import Reply, parse_ehlo


def splits(data: bytes):
    """The input whole, then cut in two at every position, then byte by byte."""
    yield [data]
    for k in range(1, len(data)):
        yield [data[:k], data[k:]]
    yield [bytes([b]) for b in data]


# ---------------------------------------------------------------- command lines


def read_lines(impl, pieces, **kw):
    r = impl.LineReader(**kw)
    out = []
    for p in pieces:
        r.feed(p)
        while True:
            try:
                line = r.readline()
            except ParseError as e:
                out.append(e)
                if e.fatal:
                    return out
                continue
            if line is None:
                break
            out.append(line)
    return out


def test_lines_every_split(impl):
    data = b"EHLO client.example\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n"
    want = [b"EHLO client.example", b"MAIL FROM:<a@b.example>", b"RCPT TO:<c@d.example>", b"DATA"]
    for pieces in splits(data):
        assert read_lines(impl, pieces) == want


def test_line_too_long_is_dropped_and_reading_goes_on(impl):
    long = b"NOOP " + b"x" * 600 + b"\r\n"
    data = long + b"QUIT\r\n"
    for pieces in [*splits(data), [long[:300], long[300:], b"QUIT\r\n"]]:
        out = read_lines(impl, pieces)
        assert len(out) == 2
        assert isinstance(out[0], ParseError) and (out[0].code, out[0].enhanced) == (500, "5.5.2")
        assert not out[0].fatal
        assert out[1] == b"QUIT"


def test_line_limit_counts_crlf(impl):
    exact = b"N" * 510 + b"\r\n"  # 512 octets with CRLF: allowed (RFC 5321 4.5.3.1.4)
    over = b"N" * 511 + b"\r\n"
    for pieces in splits(exact):
        assert read_lines(impl, pieces) == [b"N" * 510]
    for pieces in splits(over):
        out = read_lines(impl, pieces)
        assert len(out) == 1 and isinstance(out[0], ParseError) and out[0].code == 500


def test_longer_limit_for_auth_lines(impl):
    line = b"A" * 1500 + b"\r\n"
    for pieces in splits(line):
        r = impl.LineReader(max_line=512)
        r.max_line = 12288
        got = []
        for p in pieces:
            r.feed(p)
            got.append(r.readline())
        assert got[-1] == b"A" * 1500 and got[:-1] == [None] * (len(pieces) - 1)


@pytest.mark.parametrize("data", [b"NOOP\n", b"NO\nOP\r\n", b"\n"])
def test_bare_lf_in_command_is_fatal(impl, data):
    for pieces in splits(data):
        out = read_lines(impl, pieces)
        assert isinstance(out[-1], ParseError) and out[-1].fatal and out[-1].code == 521


def test_bare_lf_normalized(impl):
    for pieces in splits(b"NOOP\nQUIT\r\n"):
        assert read_lines(impl, pieces, normalize=True) == [b"NOOP", b"QUIT"]


@pytest.mark.parametrize("data", [b"NO\rOP\r\n", b"NOOP\r\r\n"])
def test_bare_cr_in_command_is_fatal(impl, data):
    for normalize in (False, True):
        for pieces in splits(data):
            out = read_lines(impl, pieces, normalize=normalize)
            assert isinstance(out[-1], ParseError) and out[-1].fatal


def test_take_returns_the_rest(impl):
    data = b"DATA\r\nSubject: x\r\n"
    for pieces in splits(data):
        r = impl.LineReader()
        got = None
        for p in pieces:
            r.feed(p)
            got = got or r.readline()
        assert got == b"DATA"
        assert r.buffered == len(b"Subject: x\r\n")
        assert r.take() == b"Subject: x\r\n"
        assert r.buffered == 0
        r.feed(b"QUIT\r\n")
        assert r.readline() == b"QUIT"


def test_parse_command(impl):
    assert impl.parse_command(b"mail FROM:<a@b>") == ("MAIL", b"FROM:<a@b>")
    assert impl.parse_command(b"Quit") == ("QUIT", b"")
    assert impl.parse_command(b"EHLO  x") == ("EHLO", b" x")
    assert impl.parse_command(b"") == ("", b"")


# ---------------------------------------------------------------- MAIL / RCPT


@pytest.mark.parametrize(
    "arg, want",
    [
        (b"FROM:<a@b.example>", MailFrom("a@b.example")),
        (b"from:<>", MailFrom("")),
        (b"FROM: <a@b.example>", MailFrom("a@b.example")),
        (b"FROM:<@hop1,@hop2.example:a@b.example>", MailFrom("a@b.example")),
        (b'FROM:<"john doe"@b.example>', MailFrom('"john doe"@b.example')),
        (b'FROM:<"a\\"b"@b.example>', MailFrom('"a\\"b"@b.example')),
        (b"FROM:<a@[192.0.2.1]>", MailFrom("a@[192.0.2.1]")),
        (b"FROM:<a@[IPv6:2001:db8::1]>", MailFrom("a@[IPv6:2001:db8::1]")),
        (b"FROM:<a.b+c@x-y.example>", MailFrom("a.b+c@x-y.example")),
        (
            b"FROM:<a@b.example> SIZE=1000 BODY=8bitmime RET=HDRS ENVID=QQ+2B1",
            MailFrom("a@b.example", size=1000, body="8BITMIME", ret="HDRS", envid="QQ+2B1"),
        ),
        (b"FROM:<a@b.example> body=7BIT", MailFrom("a@b.example", body="7BIT")),
        (
            "FROM:<jö@bü.example> SMTPUTF8".encode(),
            MailFrom("jö@bü.example", smtputf8=True),
        ),
        (b"FROM:<a@b.example> AUTH=<>", MailFrom("a@b.example", auth="<>")),
        (b"FROM:<a@b.example>  SIZE=5", MailFrom("a@b.example", size=5)),
    ],
)
def test_mail_ok(impl, arg, want):
    assert impl.parse_mail(arg) == want


@pytest.mark.parametrize(
    "arg, code, enhanced",
    [
        (b"FROM:a@b.example", 501, "5.1.7"),
        (b"TO:<a@b.example>", 501, "5.5.4"),
        (b"FROM", 501, "5.5.4"),
        (b"FROM:<a@b.example", 501, "5.1.7"),
        (b"FROM:<a@>", 501, "5.1.7"),
        (b"FROM:<@b.example>", 501, "5.1.7"),
        (b"FROM:<a..b@b.example>", 501, "5.1.7"),
        (b"FROM:<.a@b.example>", 501, "5.1.7"),
        (b"FROM:<a.@b.example>", 501, "5.1.7"),
        (b"FROM:<a@b..example>", 501, "5.1.7"),
        (b"FROM:<a@-b.example>", 501, "5.1.7"),
        (b"FROM:<a@b-.example>", 501, "5.1.7"),
        (b"FROM:<a b@b.example>", 501, "5.1.7"),
        (b"FROM:<a@[300.1.1.1]>", 501, "5.1.7"),
        (b"FROM:<a@[IPv6:zz::1]>", 501, "5.1.7"),
        (b'FROM:<"unterminated@b.example>', 501, "5.1.7"),
        (b"FROM:<postmaster>", 501, "5.1.7"),
        (b"FROM:<" + b"a" * 65 + b"@b.example>", 501, "5.5.4"),
        (b"FROM:<a@" + b"b" * 63 + (b".b" + b"b" * 62) * 4 + b">", 501, "5.5.4"),
        (b"FROM:<a@b.example> SIZE=abc", 501, "5.5.4"),
        (b"FROM:<a@b.example> SIZE=", 501, "5.5.4"),
        (b"FROM:<a@b.example> BODY=9BIT", 501, "5.5.4"),
        (b"FROM:<a@b.example> RET=ALL", 501, "5.5.4"),
        (b"FROM:<a@b.example> ENVID=" + b"x" * 101, 501, "5.5.4"),
        (b"FROM:<a@b.example> ENVID=a+zz", 501, "5.5.4"),
        (b"FROM:<a@b.example> SMTPUTF8=yes", 501, "5.5.4"),
        (b"FROM:<a@b.example> SIZE=1 SIZE=2", 501, "5.5.4"),
        (b"FROM:<a@b.example> -X=1", 501, "5.5.4"),
        (b"FROM:<a@b.example> XFOO=1", 555, "5.5.4"),
        (b"FROM:<a@b.example>garbage", 501, "5.5.4"),
        ("FROM:<jö@b.example>".encode(), 553, "5.6.7"),
        (b"FROM:<j\xff@b.example> SMTPUTF8", 501, "5.1.7"),
    ],
)
def test_mail_errors(impl, arg, code, enhanced):
    with pytest.raises(ParseError) as e:
        impl.parse_mail(arg)
    assert (e.value.code, e.value.enhanced) == (code, enhanced)
    assert not e.value.fatal


def test_domain_label_of_63_is_allowed_64_not(impl):
    """RFC 1035 2.3.4: 63 octets per label (a UTF-8 label is checked as its A-label later)."""
    assert impl.parse_rcpt(b"TO:<a@" + b"b" * 63 + b".example>").address.endswith(".example")
    for arg in (b"TO:<a@" + b"b" * 64 + b".example>", b"TO:<a@x." + b"b" * 64 + b">"):
        with pytest.raises(ParseError) as e:
            impl.parse_rcpt(arg)
        assert (e.value.code, e.value.enhanced) == (501, "5.1.3")
    with pytest.raises(ParseError) as e:
        impl.parse_mail(b"FROM:<a@" + b"b" * 64 + b".example>")
    assert (e.value.code, e.value.enhanced) == (501, "5.1.7")
    utf8 = ("\u00e9" * 40).encode()  # 80 octets of UTF-8, an A-label of far fewer
    assert impl.parse_rcpt(b"TO:<a@" + utf8 + b".example>", True).address


def test_domain_of_255_is_allowed_256_not(impl):
    label = b"b" * 63
    domain = b".".join([label] * 4)  # 255 octets
    assert len(domain) == 255
    local = b"a" * 64
    # the whole path is then 64 + 1 + 255 + 2 = 322 > 256: the path limit applies first
    with pytest.raises(ParseError) as e:
        impl.parse_mail(b"FROM:<" + local + b"@" + domain + b">")
    assert e.value.text.startswith("Path too long")
    ok = b"a@" + b"b" * 63 + b"." + b"c" * 63 + b"." + b"d" * 63 + b"." + b"e" * 60
    assert len(b"<" + ok + b">") == 256
    assert impl.parse_mail(b"FROM:<" + ok + b">").address == ok.decode()


@pytest.mark.parametrize(
    "arg, smtputf8, want",
    [
        (b"TO:<c@d.example>", False, RcptTo("c@d.example")),
        (b"to: <c@d.example>", False, RcptTo("c@d.example")),
        (b"TO:<Postmaster>", False, RcptTo("Postmaster")),
        (b"TO:<postmaster@d.example>", False, RcptTo("postmaster@d.example")),
        (
            b"TO:<c@d.example> NOTIFY=success,delay ORCPT=rfc822;c+40d.example",
            False,
            RcptTo("c@d.example", notify="SUCCESS,DELAY", orcpt="rfc822;c+40d.example"),
        ),
        (b"TO:<c@d.example> NOTIFY=NEVER", False, RcptTo("c@d.example", notify="NEVER")),
        ("TO:<ü@d.example>".encode(), True, RcptTo("ü@d.example")),
    ],
)
def test_rcpt_ok(impl, arg, smtputf8, want):
    assert impl.parse_rcpt(arg, smtputf8) == want


@pytest.mark.parametrize(
    "arg, code, enhanced",
    [
        (b"TO:<>", 501, "5.1.3"),
        (b"TO:c@d.example", 501, "5.1.3"),
        (b"FROM:<c@d.example>", 501, "5.5.4"),
        (b"TO:<c@d.example> NOTIFY=NEVER,SUCCESS", 501, "5.5.4"),
        (b"TO:<c@d.example> NOTIFY=SUCCESS,SUCCESS", 501, "5.5.4"),
        (b"TO:<c@d.example> NOTIFY=", 501, "5.5.4"),
        (b"TO:<c@d.example> ORCPT=c@d.example", 501, "5.5.4"),
        (b"TO:<c@d.example> SIZE=10", 555, "5.5.4"),
        ("TO:<ü@d.example>".encode(), 553, "5.6.7"),
    ],
)
def test_rcpt_errors(impl, arg, code, enhanced):
    with pytest.raises(ParseError) as e:
        impl.parse_rcpt(arg, False)
    assert (e.value.code, e.value.enhanced) == (code, enhanced)


# ---------------------------------------------------------------- DATA


def read_data(impl, pieces, *, mode=None, normalize=False, max_size=1 << 20, max_line=1000):
    """Feed pieces; return (content, consumed, done, error-or-fatal)."""
    mode = impl.MODE_UNSTUFF if mode is None else mode
    r = impl.DataReader(max_size, max_line, normalize, mode)
    out = []
    consumed = 0
    for p in pieces:
        try:
            consumed += r.feed(p)
        except ParseError as e:
            return b"".join(out), consumed, r.done, e
        out += r.take()
        if r.done:
            break
    return b"".join(out), consumed, r.done, r.error


MESSAGE = b"Subject: test\r\n\r\nline one\r\n..leading dot\r\n.x\r\n\r\nlast\r\n.\r\nQUIT\r\n"


def test_data_end_and_unstuffing_every_split(impl):
    want = b"Subject: test\r\n\r\nline one\r\n.leading dot\r\nx\r\n\r\nlast\r\n"
    end = MESSAGE.index(b"QUIT")
    for pieces in splits(MESSAGE):
        content, consumed, done, err = read_data(impl, pieces)
        assert (content, done, err) == (want, True, None)
        assert consumed == end


def test_data_wire_mode_keeps_stuffing_every_split(impl):
    end = MESSAGE.index(b"QUIT")
    want = MESSAGE[: end - 3]
    for pieces in splits(MESSAGE):
        content, consumed, done, err = read_data(impl, pieces, mode=impl.MODE_WIRE)
        assert (content, consumed, done, err) == (want, end, True, None)


def test_empty_message(impl):
    for mode in (impl.MODE_UNSTUFF, impl.MODE_WIRE):
        for pieces in splits(b".\r\nQUIT\r\n"):
            assert read_data(impl, pieces, mode=mode) == (b"", 3, True, None)


def test_data_is_handed_on_in_large_chunks(impl):
    body = b"".join(
        b"line %06d of the message body, long enough to be typical\r\n" % i for i in range(20000)
    )
    r = impl.DataReader(1 << 30, 1000, False, impl.MODE_WIRE)
    r.feed(body[: len(body) // 2])
    chunks = r.take()
    assert len(chunks) <= 2
    r.feed(body[len(body) // 2 :] + b".\r\n")
    chunks += r.take()
    assert len(chunks) <= 4 and b"".join(chunks) == body and r.done


# Every member of the SMTP smuggling family (https://sec-consult.com/blog/detail/smtp-smuggling-
# spoofing-e-mails-worldwide/): none may end DATA; under "reject" each is refused, under
# "normalize" it stays content.
SMUGGLING = [
    b"\n.\n",
    b"\n.\r\n",
    b"\r.\r",
    b"\r\n.\r",
    b"\r.\r\n",
    b"\r\n\x00.\r\n",
    b"\r\n.\n",
    b"\n.\r",
    b"\r\n\r.\r\n",
]


@pytest.mark.parametrize("seq", SMUGGLING, ids=[repr(s) for s in SMUGGLING])
def test_smuggling_never_ends_data(impl, seq):
    stream = b"Subject: a\r\n\r\nbody" + seq + b"MAIL FROM:<evil@x.example>\r\n"
    for mode in (impl.MODE_UNSTUFF, impl.MODE_WIRE):
        for normalize in (False, True):
            for pieces in splits(stream):
                content, consumed, done, err = read_data(
                    impl, pieces, mode=mode, normalize=normalize
                )
                assert not done, (seq, pieces)
                has_bare_cr = seq.replace(b"\r\n", b"").count(b"\r") > 0
                if b"\x00" in seq:  # not fatal (framing is intact), but never stored
                    assert (err.code, err.enhanced, err.fatal) == (554, "5.6.0", False)
                elif has_bare_cr or not normalize:
                    assert isinstance(err, ParseError) and err.fatal and err.code == 521


def read_whole(impl, pieces, *, mode=None, normalize=False, max_size=1 << 20, max_line=1000):
    """Like the session: feed pieces, take the content once at the end; (content, consumed,
    done, error, size)."""
    mode = impl.MODE_UNSTUFF if mode is None else mode
    r = impl.DataReader(max_size, max_line, normalize, mode)
    consumed = 0
    for p in pieces:
        consumed += r.feed(p)
        if r.done:
            break
    if mode == impl.MODE_BDAT and not r.done:
        r.finish()
    return b"".join(r.take()), consumed, r.done, r.error, r.size


def test_smuggling_then_real_end_normalize(impl):
    stream = b"a\n.\nMAIL FROM:<x@y>\nb\r\n.\r\n"
    want_unstuff = b"a\r\n.\r\nMAIL FROM:<x@y>\r\nb\r\n"
    want_wire = b"a\r\n..\r\nMAIL FROM:<x@y>\r\nb\r\n"
    for pieces in splits(stream):
        assert read_data(impl, pieces, normalize=True) == (want_unstuff, len(stream), True, None)
        assert read_data(impl, pieces, normalize=True, mode=impl.MODE_WIRE) == (
            want_wire,
            len(stream),
            True,
            None,
        )


@pytest.mark.parametrize(
    "stream", [b"a\r\n\x00.\r\nb\r\n.\r\nQUIT\r\n", b"a\x00b\r\n.\r\nQUIT\r\n"]
)
def test_nul_is_read_to_the_end_and_refused(impl, stream):
    """A NUL is no text (RFC 5322 2.2) and a relay that drops it would see CRLF.CRLF in
    "CRLF NUL . CRLF": the message is read to its real end, nothing of it is handed on, and
    the session answers 554 5.6.0 (the next command is read as a command)."""
    end = stream.index(b"QUIT")
    for mode in (impl.MODE_UNSTUFF, impl.MODE_WIRE):
        for normalize in (False, True):
            for pieces in splits(stream):
                content, consumed, done, err, _ = read_whole(
                    impl, pieces, mode=mode, normalize=normalize
                )
                assert (content, consumed, done) == (b"", end, True)
                assert (err.code, err.enhanced, err.fatal) == (554, "5.6.0", False)
    for pieces in splits(stream[: end - 3]):
        content, consumed, done, err, _ = read_whole(impl, pieces, mode=impl.MODE_BDAT)
        assert content == b"" and err.code == 554


def test_data_line_too_long_reads_to_end(impl):
    stream = b"x" * 1001 + b"\r\nok\r\n.\r\nQUIT\r\n"
    for pieces in splits(stream):
        content, consumed, done, err = read_data(impl, pieces)
        assert done and consumed == len(stream) - 6
        assert (err.code, err.enhanced) == (500, "5.5.2")
    ok = b"x" * 998 + b"\r\n.\r\n"  # 1000 octets with CRLF: allowed (RFC 5321 4.5.3.1.6)
    for pieces in splits(ok):
        assert read_data(impl, pieces)[3] is None


def test_line_limit_does_not_count_the_transparency_dot(impl):
    """RFC 5321 4.5.3.1.6: the 1000 octets are the line as the message has it; the dot a
    client doubled (4.5.2) is not part of it. In BDAT the dot is content; a bare LF that
    normalizing turns into CRLF counts as the two octets stored."""
    fits = b"." + b"x" * 997 + b"\r\n"  # content ".xxx...\r\n": 1000 octets
    over = b"." + b"x" * 998 + b"\r\n"
    for mode in (impl.MODE_UNSTUFF, impl.MODE_WIRE):
        for pieces in splits(b"." + fits + b".\r\n"):
            assert read_whole(impl, pieces, mode=mode)[3] is None
        for pieces in splits(b"." + over + b".\r\n"):
            assert read_whole(impl, pieces, mode=mode)[3].code == 500
    for pieces in splits(fits):
        assert read_whole(impl, pieces, mode=impl.MODE_BDAT)[3] is None
    for pieces in splits(over):
        assert read_whole(impl, pieces, mode=impl.MODE_BDAT)[3].code == 500
    for pieces in splits(b"x" * 998 + b"\n.\r\n"):
        assert read_whole(impl, pieces, normalize=True)[3] is None
    for pieces in splits(b"x" * 999 + b"\n.\r\n"):
        assert read_whole(impl, pieces, normalize=True)[3].code == 500


def test_size_is_the_message_without_transparency_dots(impl):
    """RFC 1870: SIZE counts the message, not the dots added for transport; the wire form
    kept for the spool still has them."""
    stream = b".a\r\n..\r\nb\r\n.\r\n"  # lines "a", ".", "b", each dot-stuffed or not
    wire = b".a\r\n..\r\nb\r\n"
    message = b"a\r\n.\r\nb\r\n"
    for pieces in splits(stream):
        assert read_whole(impl, pieces) == (message, len(stream), True, None, len(message))
        assert read_whole(impl, pieces, mode=impl.MODE_WIRE) == (
            wire, len(stream), True, None, len(message)
        )  # fmt: skip
        assert read_whole(impl, pieces, max_size=len(message))[3] is None
        assert read_whole(impl, pieces, max_size=len(message) - 1)[3].code == 552
    for pieces in splits(message):  # BDAT: raw content in, stuffed out
        assert read_whole(impl, pieces, mode=impl.MODE_BDAT) == (
            b"a\r\n..\r\nb\r\n", len(message), True, None, len(message)
        )  # fmt: skip
    lf = b"a\n.\nb\r\n.\r\n"  # normalized: "a\r\n", a content line ".", "b\r\n"
    for pieces in splits(lf):
        assert read_whole(impl, pieces, mode=impl.MODE_WIRE, normalize=True) == (
            b"a\r\n..\r\nb\r\n", len(lf), True, None, len(message)
        )  # fmt: skip


def test_data_too_big_reads_to_end(impl):
    stream = b"0123456789\r\n" * 10 + b".\r\n"
    for pieces in splits(stream):
        content, consumed, done, err, _ = read_whole(impl, pieces, max_size=50)
        assert done and consumed == len(stream)
        assert (err.code, err.enhanced) == (552, "5.3.4")
        assert content == b""  # nothing kept once over the limit
        assert read_whole(impl, pieces, max_size=120)[3] is None


def test_bdat_mode_stuffs_and_finishes(impl):
    raw = b".hidden\r\nline\r\n.\r\nlast without crlf"
    want = b"..hidden\r\nline\r\n..\r\nlast without crlf\r\n"
    for pieces in splits(raw):
        r = impl.DataReader(1 << 20, 1000, False, impl.MODE_BDAT)
        out = []
        for p in pieces:
            assert r.feed(p) == len(p)
            out += r.take()
        assert not r.done
        r.finish()
        out += r.take()
        assert r.done and b"".join(out) == want


def test_bdat_bare_lf_rejected_or_normalized(impl):
    for pieces in splits(b"a\nb\r\n"):
        with pytest.raises(ParseError) as e:
            read_whole(impl, pieces, mode=impl.MODE_BDAT)
        assert e.value.fatal
    for pieces in splits(b"a\n.b\r\n"):
        got = read_whole(impl, pieces, mode=impl.MODE_BDAT, normalize=True)
        assert got[0] == b"a\r\n..b\r\n"


def test_bdat_dangling_cr_is_bare(impl):
    for pieces in splits(b"abc\r"):
        with pytest.raises(ParseError):
            read_whole(impl, pieces, mode=impl.MODE_BDAT)


# ---------------------------------------------------------------- dot-stuffing (outbound)


@pytest.mark.parametrize(
    "body, want",
    [
        (b"a\r\nb\r\n", b"a\r\nb\r\n.\r\n"),
        (b"a\nb", b"a\r\nb\r\n.\r\n"),
        (b".a\n.\n..\n", b"..a\r\n..\r\n...\r\n.\r\n"),
        (b"", b".\r\n"),
        (b"a\rb\r\n", b"a\r\nb\r\n.\r\n"),
    ],
)
def test_dot_stuff(impl, body, want):
    assert impl.dot_stuff(body) == want
    assert impl.dot_stuff(body, False) == want[:-3]


def test_dot_stuff_round_trips_through_data_reader(impl):
    body = b"Subject: x\n\n.\n..\n.x\nend\n"
    wire = impl.dot_stuff(body)
    content, consumed, done, err = read_data(impl, [wire])
    assert done and err is None and content == body.replace(b"\n", b"\r\n")


# ---------------------------------------------------------------- replies (client side)


def read_replies(impl, pieces, **kw):
    r = impl.ReplyReader(**kw)
    out = []
    for p in pieces:
        r.feed(p)
        while True:
            try:
                rep = r.next_reply()
            except ParseError as e:
                out.append(e)
                return out
            if rep is None:
                break
            out.append(rep)
    return out


def test_replies_every_split(impl):
    data = (
        b"220 mx.example ESMTP\r\n"
        b"250-mx.example Hello\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-8BITMIME\r\n"
        b"250-AUTH PLAIN LOGIN\r\n250-STARTTLS\r\n250 ENHANCEDSTATUSCODES\r\n"
        b"550 5.1.1 <x@y>: Recipient address rejected\r\n"
        b"451-4.7.1 first\r\n451 4.7.1 second\r\n"
        b"250\r\n"
    )
    want = [
        Reply(220, None, ("mx.example ESMTP",)),
        Reply(
            250,
            None,
            (
                "mx.example Hello",
                "PIPELINING",
                "SIZE 10240000",
                "8BITMIME",
                "AUTH PLAIN LOGIN",
                "STARTTLS",
                "ENHANCEDSTATUSCODES",
            ),
        ),
        Reply(550, "5.1.1", ("<x@y>: Recipient address rejected",)),
        Reply(451, "4.7.1", ("first", "second")),
        Reply(250, None, ("",)),
    ]
    for pieces in splits(data):
        assert read_replies(impl, pieces) == want


def test_enhanced_code_must_match_class(impl):
    for pieces in splits(b"550 4.1.1 mismatched class\r\n"):
        (rep,) = read_replies(impl, pieces)
        assert rep.enhanced is None and rep.text == "4.1.1 mismatched class"


def test_reply_control_characters_become_question_marks(impl):
    """RFC 5321 4.2: reply text is HT and printable; an escape sequence or NUL from a remote
    server must not reach logs, DSNs and terminals as such (UTF-8 text stays)."""
    data = b"451-4.7.1 \x1b[2J\x00x\r\n451 4.7.1 \ttab \x7f \xc3\xa9\r\n"
    for pieces in splits(data):
        assert read_replies(impl, pieces) == [Reply(451, "4.7.1", ("?[2J?x", "\ttab ? \u00e9"))]


def test_reply_bare_lf_accepted(impl):
    for pieces in splits(b"250 ok\n220 x\r\n"):
        assert read_replies(impl, pieces) == [Reply(250, None, ("ok",)), Reply(220, None, ("x",))]


@pytest.mark.parametrize(
    "data",
    [b"25 short\r\n", b"abc text\r\n", b"250x\r\n", b"250-a\r\n251 b\r\n", b"650 bad class\r\n"],
)
def test_malformed_replies(impl, data):
    for pieces in splits(data):
        out = read_replies(impl, pieces)
        assert isinstance(out[-1], ParseError) and out[-1].code == 451


def test_reply_bounds(impl):
    long = b"250 " + b"x" * 3000 + b"\r\n"
    many = b"250-x\r\n" * 200 + b"250 x\r\n"
    for pieces in [*splits(long), *splits(long[:-2])]:  # terminated or not
        out = read_replies(impl, pieces, max_line=2048)
        assert len(out) == 1 and isinstance(out[0], ParseError)
    for pieces in splits(many):
        out = read_replies(impl, pieces, max_lines=128)
        assert len(out) == 1 and isinstance(out[0], ParseError)


EHLO = (
    b"250-mx.example\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n"
    b"250-STARTTLS\r\n250-AUTH PLAIN LOGIN\r\n250-CHUNKING\r\n250-DSN\r\n250 ENHANCEDSTATUSCODES\r\n"
)


def test_parse_ehlo(impl):
    """The capability map is one function over the Reply either parser makes."""
    for pieces in splits(EHLO):
        (r,) = read_replies(impl, pieces)
        caps = parse_ehlo(r)
        assert caps.pipelining and caps.size == 1000 and caps.eightbitmime and caps.smtputf8
        assert caps.starttls and caps.auth == {"PLAIN", "LOGIN"} and caps.chunking and caps.dsn
        assert caps.enhancedstatuscodes
    assert not parse_ehlo(Reply(250, None, ("mx",))).pipelining


@pytest.mark.parametrize("size", ["\u00b2", "\u0663", "1\u00b9", "-1", "x"])
def test_parse_ehlo_odd_size_is_no_limit(size):
    """A SIZE parameter that is no ASCII number ("SIZE \u00b2" passes str.isdigit, not int) is
    read as SIZE with no stated limit (0, RFC 1870 4), never an exception in the client."""
    assert parse_ehlo(Reply(250, None, ("mx", f"SIZE {size}", "PIPELINING"))).size == 0


# ---------------------------------------------------------------- any bytes-like input


@pytest.mark.parametrize("kind", [bytearray, memoryview])
def test_bytes_like_input_gives_bytes(impl, kind):
    """The session passes bytes, but callers may hand a bytearray or memoryview: both
    implementations accept it and give bytes back, never views of the caller's buffer."""
    assert impl.parse_command(kind(b"MAIL FROM:<a@b>")) == ("MAIL", b"FROM:<a@b>")
    assert impl.parse_mail(kind(b"FROM:<a@b.example> SIZE=10")) == MailFrom("a@b.example", size=10)
    assert impl.parse_rcpt(kind(b"TO:<c@d.example>")) == RcptTo("c@d.example")
    out = impl.dot_stuff(kind(b".a\nb"))
    assert out == b"..a\r\nb\r\n.\r\n" and type(out) is bytes
    r = impl.DataReader(1 << 20, 1000, False, impl.MODE_WIRE)
    assert r.feed(kind(b"a\r\n.\r\n")) == 6
    assert [type(c) for c in r.take()] == [bytes]
    lines = impl.LineReader()
    lines.feed(kind(b"NOOP\r\n"))
    assert lines.readline() == b"NOOP"
