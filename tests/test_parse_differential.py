"""Differential tests: the compiled parser (ext/_parse.pyx) against its pure-Python twin.

The twin is the reference. Each test runs the same script of calls on both implementations
and compares the traces call by call: every returned value, every ParseError (code,
enhanced, text, fatal), ``consumed`` counts, ``done`` / ``size`` / ``error`` / ``buffered``
after each call, and the joined DATA output. Inputs are random byte streams rich in the bytes
SMTP cares about (CR, LF, ".", SP, NUL, "<>@:", UTF-8), split at random points, and
structured-random MAIL/RCPT arguments built from grammar pieces.
"""

from __future__ import annotations

import importlib
import os
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastmta.protocol import _parse_py as py
from fastmta.protocol.errors import ParseError

try:
    c = importlib.import_module("fastmta.protocol._parse")
except ImportError:
    if os.environ.get("CI") == "true":
        raise  # CI builds the extension: its absence is a failure there
    pytest.skip(
        "compiled parser not built (python setup.py build_ext --inplace)",
        allow_module_level=True,
    )

FAST = settings(
    deadline=None,
    max_examples=800,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# --------------------------------------------------------------------------------------
# Trace helpers
# --------------------------------------------------------------------------------------


def outcome(fn, *args):
    """A comparable record of one call: ("ok", value) or the error's identity."""
    try:
        return ("ok", fn(*args))
    except ParseError as e:
        return ("parse-error", e.code, e.enhanced, e.text, e.fatal)
    except Exception as e:  # noqa: BLE001 - any other exception must match too
        return ("exception", type(e).__name__)


def failed(rec) -> bool:
    return rec[0] != "ok"


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(max(k, 0), len(data)) for k in cuts})
    out, prev = [], 0
    for k in points + [len(data)]:
        out.append(data[prev:k])
        prev = k
    return out


def assert_same(run, *args):
    """Run ``run(module, *args)`` on both implementations; the traces must be equal."""
    expected = run(py, *args)
    got = run(c, *args)
    assert got == expected


# Bytes SMTP cares about, as weighted pieces (lists repeat a piece to weight it)
PIECES = (
    [b"\r\n"] * 6
    + [b"\r", b"\n", b"\n", b".", b".", b"..", b" ", b" ", b"\x00", b"<", b">", b"@", b":"]
    + [b"=", b",", b";", b"+", b"-", b"[", b"]", b'"', b"\\", b"\t", b"\x7f"]
    + [bytes([x]) for x in b"abcxyzABCXYZ0129"]
    + [b"hello", b"MAIL FROM:", b"RCPT TO:", b"DATA", b"\xc3\xa9", b"\xe2\x82\xac", b"\xff"]
    + [b"\xc3", b"\xdf", b"\xb5"]
)
stream = st.lists(st.sampled_from(PIECES), max_size=120).map(b"".join)
cuts = st.lists(st.integers(0, 1000), max_size=8)
small_limit = st.one_of(st.integers(0, 24), st.sampled_from([512, 1000, 10**6]))

# --------------------------------------------------------------------------------------
# API parity
# --------------------------------------------------------------------------------------

_IMPORTED = {"annotations", "re", "MailFrom", "ParseError", "RcptTo", "Reply", "ACCELERATED"}


def _public(mod) -> set[str]:
    return {n for n in dir(mod) if not n.startswith("_") and n not in _IMPORTED}


def test_same_public_names_and_constants():
    assert _public(c) == _public(py)
    for name in _public(py):
        value = getattr(py, name)
        if isinstance(value, int | tuple):
            assert getattr(c, name) == value, name
    assert c.ACCELERATED is True and py.ACCELERATED is False


# --------------------------------------------------------------------------------------
# LineReader
# --------------------------------------------------------------------------------------


def run_lines(mod, chunks, max_line, normalize, take_at):
    r = mod.LineReader(max_line=max_line, normalize=normalize)
    trace = []
    for k, chunk in enumerate(chunks):
        trace.append(("feed", outcome(r.feed, chunk), r.buffered))
        for _ in range(10_000):
            rec = outcome(r.readline)
            trace.append(("readline", rec, r.buffered))
            if rec == ("ok", None):
                break
        if k in take_at:
            trace.append(("take", r.take(), r.buffered))
    return trace


@FAST
@given(stream, cuts, small_limit, st.booleans(), st.sets(st.integers(0, 8), max_size=2))
def test_line_reader(data, cut, max_line, normalize, take_at):
    assert_same(run_lines, split(data, cut), max_line, normalize, take_at)


def test_line_reader_memory_is_bounded_under_pipelining():
    """Feeds that always end mid-line must not keep the lines already returned."""
    for mod in (py, c):
        r = mod.LineReader()
        r.feed(b"NO")
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            for _ in range(20_000):
                r.feed(b"OP\r\nNO")
                assert r.readline() == b"NOOP"
                assert r.readline() is None
            grown = tracemalloc.get_traced_memory()[0] - base
        finally:
            tracemalloc.stop()
        assert r.buffered == 2
        assert grown < 32_768, (mod.__name__, grown)  # 20,000 x 6 bytes if kept


# --------------------------------------------------------------------------------------
# DataReader
# --------------------------------------------------------------------------------------


def run_data(mod, chunks, mode, normalize, max_line, max_size, take_at, finish):
    d = mod.DataReader(max_size, max_line=max_line, normalize=normalize, mode=mode)
    trace = []
    output = []

    def state():
        err = d.error
        err = None if err is None else (err.code, err.enhanced, err.text, err.fatal)
        return (d.done, d.size, d.line_too_long, d.nul, d.too_big, err)

    for k, chunk in enumerate(chunks):
        trace.append(("feed", outcome(d.feed, chunk), state()))
        if k in take_at:
            output.append(b"".join(d.take()))
            trace.append(("take", output[-1]))
    if finish:
        trace.append(("finish", outcome(d.finish), state()))
    output.append(b"".join(d.take()))
    trace.append(("output", b"".join(output)))
    return trace


data_stream = st.lists(
    st.sampled_from(
        [b"\r\n"] * 8
        + [b".", b".", b".\r\n", b"\r\n.\r\n", b"\r", b"\n", b".\n", b"\x00", b" ", b"\xc3\xa9"]
        + [b"line of text", b"x", b"ab", b"Subject: hi", b"QUIT\r\n"]
    ),
    max_size=80,
).map(b"".join)


@FAST
@given(
    data_stream,
    cuts,
    st.sampled_from([py.MODE_UNSTUFF, py.MODE_WIRE, py.MODE_BDAT]),
    st.booleans(),
    small_limit,
    st.one_of(st.integers(0, 64), st.just(10**9)),
    st.sets(st.integers(0, 8), max_size=3),
    st.booleans(),
)
def test_data_reader(data, cut, mode, normalize, max_line, max_size, take_at, finish):
    assert_same(run_data, split(data, cut), mode, normalize, max_line, max_size, take_at, finish)


@FAST
@given(stream, cuts, st.sampled_from([0, 1, 2]), st.booleans(), small_limit)
def test_data_reader_on_raw_bytes(data, cut, mode, normalize, max_line):
    assert_same(run_data, split(data, cut), mode, normalize, max_line, 10**9, {1, 3}, True)


def test_data_reader_every_split_point():
    """A realistic message with every kind of line, split at every single point."""
    msg = (
        b"From: a@b\r\nSubject: x\r\n\r\n.hidden\r\n..two\r\n.\r\nX\r\n"
        b"\r\n" + b"A" * 30 + b"\r\n.\r\nNEXT COMMAND\r\n"
    )
    for mode in (py.MODE_UNSTUFF, py.MODE_WIRE, py.MODE_BDAT):
        for k in range(len(msg) + 1):
            for j in (k, min(k + 1, len(msg)), min(k + 7, len(msg))):
                chunks = [msg[:k], msg[k:j], msg[j:]]
                assert_same(run_data, chunks, mode, False, 1000, 10**6, set(), True)


def test_data_output_is_few_large_chunks():
    body = b"".join(b"%04d " % k + b"Q" * 70 + b"\r\n" for k in range(2000))
    body += b"..dotted line\r\n" + body
    feed = body + b".\r\n"
    for mode, most in ((py.MODE_WIRE, 1), (py.MODE_UNSTUFF, 2)):
        d = c.DataReader(10**9, mode=mode)
        assert d.feed(feed) == len(feed)
        chunks = d.take()
        assert len(chunks) <= most
        expected = body.replace(b"\r\n..", b"\r\n.") if mode == py.MODE_UNSTUFF else body
        assert b"".join(chunks) == expected


# --------------------------------------------------------------------------------------
# Commands, MAIL and RCPT arguments
# --------------------------------------------------------------------------------------


@FAST
@given(stream)
def test_parse_command(line):
    assert outcome(c.parse_command, line) == outcome(py.parse_command, line)


def run_args(mod, arg, smtputf8):
    return [outcome(mod.parse_mail, arg), outcome(mod.parse_rcpt, arg, smtputf8)]


@FAST
@given(st.sampled_from([b"", b"FROM:", b"TO:", b"from: ", b"To:"]), stream, st.booleans())
def test_mail_rcpt_random(prefix, rest, smtputf8):
    assert_same(run_args, prefix + rest, smtputf8)


def _opt(s):
    return st.one_of(st.just(b""), s)


atom = st.lists(
    st.sampled_from([b"a", b"Z", b"0", b"+", b"-", b"_", b"=", b"\xc3\xa9", b"\xff", b"#"]),
    min_size=0,
    max_size=6,
).map(b"".join)
local = st.one_of(
    st.lists(atom, min_size=1, max_size=4).map(b".".join),
    st.lists(st.sampled_from([b"a", b" ", b'\\"', b"\\", b"@", b"\xc3\xa9", b"\x01"])).map(
        lambda p: b'"' + b"".join(p) + b'"'
    ),
    st.sampled_from([b"postmaster", b"PostMaster", b"a" * 64, b"a" * 65]),
)
label = st.lists(
    st.sampled_from([b"a", b"Z", b"9", b"-", b"\xc3\xa9", b"_"]), min_size=0, max_size=8
).map(b"".join)
literal = st.sampled_from(
    [
        b"[1.2.3.4]",
        b"[256.1.1.1]",
        b"[1.2.3]",
        b"[IPv6:::1]",
        b"[ipv6:2001:db8::1]",
        b"[IPv6:zz]",
        b"[x-tag:stuff]",
        b"[tag-:x]",
        b"[]",
        b"[1.2.3.4",
    ]
)
domain = st.one_of(
    st.lists(label, min_size=1, max_size=4).map(b".".join),
    literal,
    st.just(b"d" * 63 + (b".d" + b"d" * 62) * 4),
)
route = _opt(
    st.lists(domain.map(lambda d: b"@" + d), min_size=1, max_size=2).map(
        lambda hops: b",".join(hops) + b":"
    )
)
path = st.one_of(
    st.tuples(route, local, _opt(domain.map(lambda d: b"@" + d))).map(
        lambda t: b"<" + t[0] + t[1] + t[2] + b">"
    ),
    st.sampled_from([b"<>", b"<", b"a@b", b"<a@b", b"<@>"]),
)
_VALUES = {
    b"SIZE": [b"0", b"1000", b"1" * 18, b"9" * 19, b"9" * 20, b"1" * 21, b"1x", b""],
    b"BODY": [b"7bit", b"8BITMIME", b"BINARYMIME", b"8bit"],
    b"RET": [b"FULL", b"hdrs", b"x"],
    b"ENVID": [b"e" * 100, b"e" * 101, b"a+2Bb", b"a+2", b"+zz", b"x=y", b"\xc3\xa9"],
    b"AUTH": [b"<>", b"a+2Bb", b"x@y", b"<", b"+4"],
    b"NOTIFY": [b"NEVER", b"success,delay", b"SUCCESS,SUCCESS", b"failure,", b"never,delay"],
    b"ORCPT": [b"rfc822;a+40b", b"utf-8;\xc3\xa9", b"UTF-8;a", b";x", b"rfc822", b"a_b;x"],
    b"SMTPUTF8": [b"x"],
    b"X-FOO": [b"1"],
}
keyword = st.sampled_from(list(_VALUES) + [b"size", b"notify", b"-X", b"", b"BAD!", b"x_y"])
param = st.one_of(
    keyword,
    st.sampled_from(
        [k + b"=" + v for k, vs in _VALUES.items() for v in vs]
        + [b"size=10", b"Body=7BIT", b"orcpt=rfc822;x", b"X-FOO=", b"=x", b"A=\x7f"]
    ),
)
params = st.lists(st.tuples(st.sampled_from([b" ", b"  ", b""]), param), max_size=4).map(
    lambda ps: b"".join(sp + p for sp, p in ps)
)


@FAST
@given(st.sampled_from([b"FROM:", b"TO:", b"From: ", b"to:  "]), path, params, st.booleans())
def test_mail_rcpt_structured(keyword, p, ps, smtputf8):
    assert_same(run_args, keyword + p + ps, smtputf8)


def test_mail_rcpt_examples_agree_and_parse():
    ok = [
        (b"FROM:<a@example.com> SIZE=100 BODY=8BITMIME", "mail"),
        (b"FROM:<> RET=HDRS ENVID=x+2By AUTH=<>", "mail"),
        (b"FROM:<\xc3\xa9@b.example> SMTPUTF8", "mail"),
        (b"TO:<Postmaster> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;a+40b", "rcpt"),
        (b"TO:<@r1.example,@r2.example:u@[1.2.3.4]>", "rcpt"),
    ]
    for arg, kind in ok:
        fn = "parse_mail" if kind == "mail" else "parse_rcpt"
        got, expected = getattr(c, fn)(arg), getattr(py, fn)(arg)
        assert got == expected


# --------------------------------------------------------------------------------------
# dot_stuff and ReplyReader
# --------------------------------------------------------------------------------------


@FAST
@given(stream, st.booleans())
def test_dot_stuff(body, terminate):
    assert c.dot_stuff(body, terminate) == py.dot_stuff(body, terminate)


reply_stream = st.lists(
    st.sampled_from(
        [b"\r\n"] * 4
        + [b"\n", b"\r", b"250", b"250-", b"250 ", b"550 5.1.1 ", b"451-4.7.0 ", b"2.0.0 "]
        + [b"2.0.0", b"5.1.12345 ", b"354 ", b"-", b" ", b"text", b"\xc3\xa9", b"\xff", b"1"]
        + [b"6", b"25", b"2.", b"2.1.", b"5.5.1", b"2.0.1234 ", b"2.123.4 ", b"2.1234.5 "]
    ),
    max_size=60,
).map(b"".join)


reply_line = st.tuples(
    st.sampled_from([b"250", b"220", b"451", b"550", b"354", b"199", b"260", b"25", b"2x0"]),
    st.sampled_from([b" ", b"-", b"", b"x"]),
    st.sampled_from(
        [b"", b"2.0.0 ", b"2.1.5 ", b"4.7.0 ", b"5.1.1 ", b"2.0.0", b"2.123.456 ", b"2.0.1234 "]
        + [b"2.1234.5 ", b"2.0. ", b"2..0 ", b"22.0.0 ", b"2.0.0x "]
    ),
    st.sampled_from([b"", b"Ok", b"PIPELINING", b"\xc3\xa9t\xc3\xa9", b"\xff", b"a\rb"]),
    st.sampled_from([b"\r\n", b"\r\n", b"\n", b""]),
).map(b"".join)
structured_replies = st.lists(reply_line, max_size=12).map(b"".join)


def run_replies(mod, chunks, max_line, max_lines):
    r = mod.ReplyReader(max_line=max_line, max_lines=max_lines)
    trace = []
    for chunk in chunks:
        r.feed(chunk)
        for _ in range(1_000):
            rec = outcome(r.next_reply)
            trace.append(rec)
            if rec == ("ok", None) or failed(rec):
                break
    return trace


@FAST
@given(
    reply_stream,
    cuts,
    st.one_of(st.integers(0, 30), st.just(2048)),
    st.one_of(st.integers(0, 4), st.just(128)),
)
def test_reply_reader(data, cut, max_line, max_lines):
    assert_same(run_replies, split(data, cut), max_line, max_lines)


@FAST
@given(structured_replies, cuts, st.sampled_from([10, 30, 2048]), st.sampled_from([2, 128]))
def test_reply_reader_structured(data, cut, max_line, max_lines):
    assert_same(run_replies, split(data, cut), max_line, max_lines)


EDGE_ARGS = [
    b"FROM:<a@b> ENVID=" + b"e" * 100,
    b"FROM:<a@b> ENVID=" + b"e" * 101,
    b"FROM:<a@b> SIZE=" + b"9" * 18,
    b"FROM:<a@b> SIZE=" + b"9" * 19,
    b"FROM:<a@b> SIZE=" + b"9" * 20,
    b"FROM:<a@b> SIZE=" + b"9" * 21,
    b"FROM:<" + b"l" * 64 + b"@b>",
    b"FROM:<" + b"l" * 65 + b"@b>",
    b"FROM:<a@" + b"d" * 63 + (b".d" + b"d" * 62) * 3 + b"dd>",
    b"FROM:<a@" + b"d" * 63 + (b".d" + b"d" * 62) * 3 + b"ddd>",
    b"TO:<" + b"l" * 64 + b"@" + b"d" * 63 + (b".d" + b"d" * 62) * 3 + b">",
    b"TO:<" + b"l" * 64 + b"@" + b"d" * 63 + (b".d" + b"d" * 62) * 3 + b"d>",
    b"FROM:<a@b> SIZE=1 size=2",
    b"FROM:<a@b> X=1 x=2",
    b"FROM:<a@b> X=1 Y=2",
    b"FROM:<a@b> SIZE=x X=1 BAD!",
    b"TO:<postmaster>",
    b"TO:<POSTMASTER> NOTIFY=never",
    b"FROM:<postmaster>",
    b"FRO",
    b"TO",
    b"FROM:",
    b"FROM:<\xc3\xa9@b>",
    b"FROM:<\xc3\xa9@b> SMTPUTF8",
    b"FROM:<\xff@b> SMTPUTF8",
    b"TO:<\xc3\xa9@b> ORCPT=utf-8;\xc3\xa9",
    b'FROM:<"a b\\"c"@b>',
    b"TO:<@a,@b:c@d>",
    b"TO:<@[IPv6:::1]:c@d>",
    b"TO:<a@[x:>]>",
    b"TO:<a@-b.c>",
    b"TO:<a@b.-c>",
    b"TO:<a@b-.c>",
    b"TO:<a@b->",
    b"TO:<a@b--c.d>",
    b"TO:<a@b..c>",
    b"TO:<.a@b>",
    b"TO:<a.@b>",
    b"TO:<a..b@c>",
]


@pytest.mark.parametrize("smtputf8", [False, True])
def test_mail_rcpt_edges(smtputf8):
    for arg in EDGE_ARGS:
        assert_same(run_args, arg, smtputf8)


EDGE_REPLIES = [
    b"250 2.0.1234 x\r\n",
    b"250 2.1234.0 x\r\n",
    b"250 2.123.123 x\r\n",
    b"250 2.0.0\r\n",
    b"250 3.0.0 x\r\n",
    b"250-2.0.0 a\r\n250-b\r\n250 2.0.0 c\r\n",
    b"250-a\r\n251 b\r\n",
    b"250\r\n",
    b"25\r\n",
    b"250x\r\n",
]


def test_reply_edges():
    for data in EDGE_REPLIES:
        for max_line in (4, 12, 2048):
            for max_lines in (1, 2, 128):
                assert_same(run_replies, [data], max_line, max_lines)
