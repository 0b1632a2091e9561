# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The SMTP parser, compiled: fastmta.protocol._parse (sans-IO).

The twin fastmta/protocol/_parse_py.py is the reference: same API, same results, same
errors, same ``consumed`` counts, same state after each feed (tests/test_parse*.py run on
both, tests/test_parse_differential.py compares them on random input). Change one, change
the other. The twin's docstrings are the spec; this file says only how it is made fast.

Contracts that hold for every class here: no I/O, no await; input arrives in chunks split
anywhere; nothing already scanned is scanned again; every buffer is bounded; no Python object
is created per byte, and per line only the objects the caller receives.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize
from cpython.bytes cimport PyBytes_GET_SIZE
from cpython.list cimport PyList_Append, PyList_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Realloc
from cpython.ref cimport Py_DECREF, Py_INCREF
from libc.stdint cimport uint64_t
from libc.string cimport memchr, memcpy, memmove

from fastmta.protocol._parse_py import _valid_literal  # rare: address literals (4.1.3)
from fastmta.protocol.errors import MailFrom, ParseError, RcptTo
from fastmta.protocol.replies import Reply

cdef extern from "Python.h":
    object PyUnicode_DecodeASCII(const char* s, Py_ssize_t size, const char* errors)
    object PyUnicode_DecodeLatin1(const char* s, Py_ssize_t size, const char* errors)
    object PyUnicode_DecodeUTF8(const char* s, Py_ssize_t size, const char* errors)
    int _PyBytes_Resize(PyObject** bytes, Py_ssize_t newsize) except -1
    ctypedef struct PyObject

ACCELERATED = True

CR = 13
LF = 10
DOT = 46

cdef enum:
    C_CR = 13
    C_LF = 10
    C_DOT = 46
    C_SP = 32

# --------------------------------------------------------------------------------------
# Helpers: input as bytes, growable C buffers, character classes
# --------------------------------------------------------------------------------------


cdef inline bytes _as_bytes(object data):
    """Exact bytes as is; any other bytes-like object copied once (the twin slices it)."""
    if PyBytes_CheckExact(data):
        return <bytes>data
    return bytes(data)


cdef inline Py_ssize_t _find(const unsigned char* p, Py_ssize_t i, Py_ssize_t n, int c):
    """Index of the first ``c`` in p[i:n], or -1."""
    if i >= n:
        return -1
    cdef const unsigned char* q = <const unsigned char*>memchr(p + i, c, <size_t>(n - i))
    return -1 if q == NULL else q - p


cdef struct Buf:
    # A byte buffer owned by a reader: data[pos:len] is unconsumed, scanning resumed at scan.
    char* data
    Py_ssize_t len
    Py_ssize_t cap
    Py_ssize_t pos
    Py_ssize_t scan


cdef int _buf_feed(Buf* b, const char* src, Py_ssize_t n) except -1:
    """Drop the consumed prefix, then append src[:n]. Memory is what is unconsumed (plus
    slack); a large buffer shrinks back once drained."""
    cdef Py_ssize_t keep, need, cap
    cdef char* nd
    if b.pos:
        keep = b.len - b.pos
        if keep:
            memmove(b.data, b.data + b.pos, <size_t>keep)
        b.len = keep
        b.scan = b.scan - b.pos if b.scan > b.pos else 0
        b.pos = 0
    need = b.len + n
    if need > b.cap or (b.cap > 262144 and need < b.cap // 8):
        cap = 1024
        while cap < need:
            cap *= 2
        nd = <char*>PyMem_Realloc(b.data, <size_t>cap)
        if nd == NULL:
            raise MemoryError()
        b.data = nd
        b.cap = cap
    if n:
        memcpy(b.data + b.len, src, <size_t>n)
    b.len = need
    return 0


cdef inline void _buf_reset(Buf* b):
    b.len = b.pos = b.scan = 0


# Character classes (RFC 5321 4.1.2, RFC 5322 3.2.3, RFC 3461 4)
cdef enum:
    K_ATEXT = 1
    K_LETDIG = 2
    K_HEX = 4
    K_DIGIT = 8

cdef unsigned char _CLS[256]


cdef void _init_classes():
    cdef int c
    cdef bytes atext = (
        b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~"
    )
    for c in range(256):
        _CLS[c] = 0
    for c in atext:
        _CLS[c] |= K_ATEXT
    for c in b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789":
        _CLS[c] |= K_LETDIG
    for c in b"0123456789abcdefABCDEF":
        _CLS[c] |= K_HEX
    for c in b"0123456789":
        _CLS[c] |= K_DIGIT


_init_classes()


cdef inline unsigned char _upper(unsigned char c):
    """ASCII upper case, as bytes.upper() does."""
    return c - 32 if 97 <= c <= 122 else c


cdef inline bint _eq_upper(const unsigned char* s, Py_ssize_t n, const char* word):
    """s[:n].upper() == word (word is upper-case ASCII, NUL-terminated)."""
    cdef Py_ssize_t k = 0
    while k < n:
        if word[k] == 0 or _upper(s[k]) != <unsigned char>word[k]:
            return False
        k += 1
    return word[n] == 0


# --------------------------------------------------------------------------------------
# Command lines (server side)
# --------------------------------------------------------------------------------------

ERR_LINE_TOO_LONG = (500, "5.5.2", "Line too long")  # RFC 5321 4.5.3.1.4
ERR_BARE_LF = (521, "5.5.2", "Error: bare <LF> received")  # Postfix 3.9 smtpd_forbid_bare_newline
ERR_BARE_CR = (521, "5.5.2", "Error: bare <CR> received")
ERR_TOO_BIG = (552, "5.3.4", "Error: message file too big")  # RFC 1870 6.3
ERR_DATA_LINE = (500, "5.5.2", "Error: message line too long")  # RFC 5321 4.5.3.1.6
ERR_NUL = (554, "5.6.0", "Error: NUL character in message content")  # see the twin


cdef object _fatal(tuple err):
    return ParseError(err[0], err[1], err[2], True)


@cython.final
cdef class LineReader:
    """CRLF-framed command lines (RFC 5321 2.3.8). See the twin for the contract.

    ``max_line`` counts the CRLF: 512 octets for commands (4.5.3.1.4)."""

    cdef public Py_ssize_t max_line
    cdef public bint normalize
    cdef Buf _b
    cdef bint _discard  # dropping the rest of an over-long line

    def __init__(self, Py_ssize_t max_line=512, bint normalize=False):
        self.max_line = max_line
        self.normalize = normalize
        self._discard = False

    def __dealloc__(self):
        PyMem_Free(self._b.data)

    def feed(self, data) -> None:
        cdef bytes d = _as_bytes(data)
        cdef const char* p = PyBytes_AS_STRING(d)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(d)
        cdef Py_ssize_t i
        if self._discard:
            i = _find(<const unsigned char*>p, 0, n, C_LF)
            if i < 0:
                return
            self._discard = False
            p += i + 1
            n -= i + 1
        _buf_feed(&self._b, p, n)

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as a line."""
        return self._b.len - self._b.pos

    def take(self) -> bytes:
        """Return and forget every buffered byte (the session switches to DATA, BDAT or TLS)."""
        out = PyBytes_FromStringAndSize(self._b.data + self._b.pos, self._b.len - self._b.pos)
        _buf_reset(&self._b)
        return out

    def readline(self):
        """The next complete line without its CRLF, or None until one has arrived."""
        cdef const unsigned char* buf = <const unsigned char*>self._b.data
        cdef Py_ssize_t start = self._b.pos
        cdef Py_ssize_t length = self._b.len
        cdef Py_ssize_t lf, end
        lf = _find(buf, self._b.scan if self._b.scan > start else start, length, C_LF)
        if lf < 0:
            if length - start > self.max_line:
                # 4.5.3.1.4: over-long; drop what we have and the rest up to the next LF.
                _buf_reset(&self._b)
                self._discard = True
                raise ParseError(*ERR_LINE_TOO_LONG)
            self._b.scan = length
            return None
        self._b.pos = self._b.scan = lf + 1
        if lf + 1 - start > self.max_line:
            raise ParseError(*ERR_LINE_TOO_LONG)
        if lf > start and buf[lf - 1] == C_CR:
            end = lf - 1
        elif self.normalize:
            end = lf
        else:
            raise _fatal(ERR_BARE_LF)
        if _find(buf, start, end, C_CR) >= 0:
            raise _fatal(ERR_BARE_CR)
        return PyBytes_FromStringAndSize(<const char*>buf + start, end - start)


def parse_command(line):
    """Split a command line into (VERB, argument); the verb upper-cased (RFC 5321 2.4)."""
    cdef bytes s = _as_bytes(line)
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(s)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(s)
    cdef Py_ssize_t sp = _find(p, 0, n, C_SP)
    cdef Py_ssize_t vlen = n if sp < 0 else sp
    cdef unsigned char up[32]
    cdef Py_ssize_t k
    cdef bint ascii = vlen <= 32
    arg = b"" if sp < 0 else PyBytes_FromStringAndSize(<const char*>p + sp + 1, n - sp - 1)
    if ascii:
        for k in range(vlen):
            if p[k] >= 128:
                ascii = False
                break
            up[k] = _upper(p[k])
    if ascii:
        verb = PyUnicode_DecodeASCII(<const char*>up, vlen, NULL)
    else:  # latin-1 upper case has its own rules ("ß" -> "SS"): let Python apply them
        verb = PyUnicode_DecodeLatin1(<const char*>p, vlen, NULL).upper()
    return verb, arg


# --------------------------------------------------------------------------------------
# MAIL FROM / RCPT TO (RFC 5321 4.1.2, RFC 6531 3.3, RFC 1870, RFC 6152, RFC 3461)
# --------------------------------------------------------------------------------------

MAX_LOCAL = 64  # 4.5.3.1.1
MAX_DOMAIN = 255  # 4.5.3.1.2
MAX_PATH = 256  # 4.5.3.1.3, including the angle brackets
MAX_ENVID = 100  # RFC 3461 4.4

cdef enum:
    C_MAX_LOCAL = 64
    C_MAX_DOMAIN = 255
    C_MAX_PATH = 256
    C_MAX_ENVID = 100

ERR_MAIL_SYNTAX = (501, "5.5.4", "Syntax: MAIL FROM:<address>")
ERR_RCPT_SYNTAX = (501, "5.5.4", "Syntax: RCPT TO:<address>")
ERR_SENDER = (501, "5.1.7", "Bad sender address syntax")
ERR_RCPT = (501, "5.1.3", "Bad recipient address syntax")
ERR_PATH_LONG = (501, "5.5.4", "Path too long")  # 4.5.3.1.3
ERR_LOCAL_LONG = (501, "5.5.4", "Local part too long")  # 4.5.3.1.1
ERR_DOMAIN_LONG = (501, "5.5.4", "Domain too long")  # 4.5.3.1.2
ERR_UTF8 = (553, "5.6.7", "Non-ASCII address requires SMTPUTF8")  # RFC 6531 3.5
ERR_PARAM = (501, "5.5.4", "Bad parameter syntax")
ERR_DUP = (501, "5.5.4", "Duplicate parameter")


cdef object _err(tuple err, str detail=None):
    code, enh, text = err
    return ParseError(code, enh, f"{text}: {detail}" if detail else text)


cdef Py_ssize_t _mailbox_end(
    const unsigned char* s, Py_ssize_t i, Py_ssize_t n, tuple bad
) except -1:
    """Local-part (Dot-string / Quoted-string, 4.1.2) from s[i]; the index after it."""
    cdef unsigned char c
    cdef Py_ssize_t atom
    if i < n and s[i] == 34:  # DQUOTE
        i += 1
        while True:
            if i >= n:
                raise _err(bad)
            c = s[i]
            if c == 34:
                return i + 1
            if c == 92:  # quoted-pairSMTP = %d92 %d32-126
                if i + 1 >= n or not (32 <= s[i + 1] <= 126):
                    raise _err(bad)
                i += 2
            elif 32 <= c <= 126 or c >= 128:  # qtextSMTP (+ UTF8-non-ascii, RFC 6531)
                i += 1
            else:
                raise _err(bad)
    atom = 0
    while i < n:
        c = s[i]
        if (_CLS[c] & K_ATEXT) or c >= 128:
            atom += 1
        elif c == C_DOT and atom:
            atom = 0
        else:
            break
        i += 1
    if not atom:  # empty, leading/trailing or double dot
        raise _err(bad)
    return i


cdef Py_ssize_t _domain_end(
    const unsigned char* s, Py_ssize_t i, Py_ssize_t n, tuple bad
) except -1:
    """Domain / address-literal (4.1.2, 4.1.3) from s[i]; the index after it."""
    cdef Py_ssize_t j, label = 0
    cdef unsigned char c, last = 0
    cdef bint utf8 = False
    if i < n and s[i] == 91:  # "[" address-literal
        j = _find(s, i, n, 93)
        if j < 0:
            raise _err(bad)
        if not _valid_literal(PyBytes_FromStringAndSize(<const char*>s + i + 1, j - i - 1)):
            raise _err(bad)
        return j + 1
    while i < n:
        c = s[i]
        if (_CLS[c] & K_LETDIG) or c >= 128:
            label += 1
            utf8 = utf8 or c >= 128
        elif c == 45 and label:  # "-" not first
            label += 1
        elif c == C_DOT and label and last != 45:
            label = 0
            utf8 = False
        else:
            break
        if label > 63 and not utf8:  # RFC 1035 2.3.4 (see the twin)
            raise _err(bad)
        last = c
        i += 1
    if not label or last == 45:
        raise _err(bad)
    return i


cdef struct Path:
    Py_ssize_t mstart  # the address is s[mstart:end]; mstart == end for "<>"
    Py_ssize_t end
    Py_ssize_t next  # index after ">"
    bint eight


cdef int _parse_path(
    const unsigned char* s, Py_ssize_t i, Py_ssize_t n, tuple bad,
    bint allow_null, bint allow_postmaster, Path* out,
) except -1:
    """``<path>`` at s[i] (4.1.2); fills ``out``."""
    cdef Py_ssize_t start, colon, h, hend, mstart, dstart, local_len, end, k
    if i >= n or s[i] != 60:  # "<"
        raise _err(bad)
    start = i
    i += 1
    if i < n and s[i] == 62:  # "<>"
        if not allow_null:
            raise _err(bad)
        out.mstart = out.end = i
        out.next = i + 1
        out.eight = False
        return 0
    # A-d-l: source route "@a,@b:" is accepted and ignored (4.1.1.3, Appendix C)
    if i < n and s[i] == 64:
        colon = _find(s, i, n, 58)
        if colon < 0:
            raise _err(bad)
        h = i
        while True:
            hend = _find(s, h, colon, 44)
            if hend < 0:
                hend = colon
            if (
                hend - h < 2
                or s[h] != 64
                or _domain_end(s + h, 1, hend - h, bad) != hend - h
            ):
                raise _err(bad)
            if hend == colon:
                break
            h = hend + 1
        i = colon + 1
    mstart = i
    i = _mailbox_end(s, i, n, bad)
    local_len = i - mstart
    if i < n and s[i] == 62 and allow_postmaster and _eq_upper(s + mstart, local_len, "POSTMASTER"):
        end = i
    else:
        if i >= n or s[i] != 64:
            raise _err(bad)
        dstart = i + 1
        i = _domain_end(s, dstart, n, bad)
        if i >= n or s[i] != 62:
            raise _err(bad)
        if i - dstart > C_MAX_DOMAIN:
            raise _err(ERR_DOMAIN_LONG)
        end = i
    if local_len > C_MAX_LOCAL:
        raise _err(ERR_LOCAL_LONG)
    if end + 1 - start > C_MAX_PATH:
        raise _err(ERR_PATH_LONG)
    out.mstart = mstart
    out.end = end
    out.next = end + 1
    out.eight = False
    for k in range(mstart, end):
        if s[k] >= 128:
            out.eight = True
            break
    return 0


cdef str _address(const unsigned char* s, Path* p, tuple bad):
    if not p.eight:
        return PyUnicode_DecodeASCII(<const char*>s + p.mstart, p.end - p.mstart, NULL)
    try:
        return PyUnicode_DecodeUTF8(<const char*>s + p.mstart, p.end - p.mstart, NULL)
    except UnicodeDecodeError:
        raise _err(bad) from None


# Known ESMTP keywords, as bits for duplicate detection without building strings
cdef enum:
    P_OTHER = 0
    P_SIZE = 1
    P_BODY = 2
    P_SMTPUTF8 = 3
    P_RET = 4
    P_ENVID = 5
    P_AUTH = 6
    P_NOTIFY = 7
    P_ORCPT = 8


cdef struct Param:
    Py_ssize_t ks  # keyword s[ks:ke]
    Py_ssize_t ke
    Py_ssize_t vs  # value s[vs:ve]; vs < 0: no value
    Py_ssize_t ve
    int kid


cdef int _keyword_id(const unsigned char* s, Py_ssize_t n):
    if _eq_upper(s, n, "SIZE"):
        return P_SIZE
    if _eq_upper(s, n, "BODY"):
        return P_BODY
    if _eq_upper(s, n, "SMTPUTF8"):
        return P_SMTPUTF8
    if _eq_upper(s, n, "RET"):
        return P_RET
    if _eq_upper(s, n, "ENVID"):
        return P_ENVID
    if _eq_upper(s, n, "AUTH"):
        return P_AUTH
    if _eq_upper(s, n, "NOTIFY"):
        return P_NOTIFY
    if _eq_upper(s, n, "ORCPT"):
        return P_ORCPT
    return P_OTHER


cdef str _key(const unsigned char* s, Param* p):
    return PyUnicode_DecodeASCII(<const char*>s + p.ks, p.ke - p.ks, NULL).upper()


cdef Py_ssize_t _next_param(
    const unsigned char* s, Py_ssize_t i, Py_ssize_t n, Param* p
) except -2:
    """One esmtp-param (4.1.2) from s[i] (at the SP before it). Returns the index after it,
    or -1 at the end. Raises ERR_PARAM on bad syntax."""
    cdef Py_ssize_t j, eq, k
    cdef unsigned char c
    if i >= n:
        return -1
    if s[i] != C_SP:
        raise _err(ERR_PARAM)
    while i < n and s[i] == C_SP:
        i += 1
    if i >= n:
        return -1
    j = _find(s, i, n, C_SP)
    if j < 0:
        j = n
    eq = _find(s, i, j, 61)
    p.ks = i
    p.ke = j if eq < 0 else eq
    # esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-")
    if p.ke == i or not (_CLS[s[i]] & K_LETDIG):
        raise _err(ERR_PARAM)
    for k in range(i, p.ke):
        if not (_CLS[s[k]] & K_LETDIG) and s[k] != 45:
            raise _err(ERR_PARAM)
    p.vs = p.ve = -1
    if eq >= 0:
        # esmtp-value = 1*(%d33-60 / %d62-126), UTF-8 allowed by RFC 6531 3.3
        p.vs = eq + 1
        p.ve = j
        if p.vs == j:
            raise _err(ERR_PARAM)
        for k in range(p.vs, j):
            c = s[k]
            if c < 33 or c == 61 or c == 127:
                raise _err(ERR_PARAM)
    p.kid = _keyword_id(s + p.ks, p.ke - p.ks)
    return j


cdef int _check_params(const unsigned char* s, Py_ssize_t i, Py_ssize_t n) except -1:
    """Pass 1 over the parameters: syntax and duplicates, in order, as the twin's _params."""
    cdef Param p
    cdef unsigned int seen = 0
    cdef set others = None
    cdef str key
    while True:
        i = _next_param(s, i, n, &p)
        if i < 0:
            return 0
        if p.kid != P_OTHER:
            if seen & (1u << p.kid):
                raise _err(ERR_DUP, _key(s, &p))
            seen |= 1u << p.kid
        else:
            key = _key(s, &p)
            if others is None:
                others = set()
            elif key in others:
                raise _err(ERR_DUP, key)
            others.add(key)


cdef bint _xtext_ok(const unsigned char* v, Py_ssize_t n):
    """xtext (RFC 3461 4): xchar = %d33-42 / %d44-60 / %d62-126; hexchar = "+" 2HEX."""
    cdef Py_ssize_t i = 0
    cdef unsigned char c
    while i < n:
        c = v[i]
        if c == 43:  # "+"
            if i + 2 >= n or not (_CLS[v[i + 1]] & K_HEX) or not (_CLS[v[i + 2]] & K_HEX):
                return False
            i += 3
        elif 33 <= c <= 126 and c != 61:
            i += 1
        else:
            return False
    return True


cdef Py_ssize_t _skip_keyword(
    const unsigned char* s, Py_ssize_t n, const char* kw, Py_ssize_t kn, tuple syntax
) except -1:
    """Match "FROM:" / "TO:" case-insensitively, then skip spaces."""
    if n < kn or not _eq_upper(s, kn, kw):
        raise _err(syntax)
    cdef Py_ssize_t i = kn
    while i < n and s[i] == C_SP:
        i += 1
    return i


cdef object _value_bytes(const unsigned char* s, Param* p):
    return PyBytes_FromStringAndSize(<const char*>s + p.vs, p.ve - p.vs)


def parse_mail(arg) -> MailFrom:
    """Parse the argument of MAIL (``FROM:<path> [params]``). Raises ParseError."""
    cdef bytes b = _as_bytes(arg)
    cdef const unsigned char* s = <const unsigned char*>PyBytes_AS_STRING(b)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(b)
    cdef Path path
    cdef Param p
    cdef Py_ssize_t i, k, vn
    cdef unsigned long long num
    cdef bint smtputf8 = False
    size = body = ret = envid = auth = None
    i = _skip_keyword(s, n, "FROM:", 5, ERR_MAIL_SYNTAX)
    _parse_path(s, i, n, ERR_SENDER, True, False, &path)
    address = _address(s, &path, ERR_SENDER)
    i = path.next
    _check_params(s, i, n)
    while True:
        i = _next_param(s, i, n, &p)
        if i < 0:
            break
        vn = p.ve - p.vs
        if p.kid == P_SIZE:
            if p.vs < 0 or vn > 20:
                raise _err(ERR_PARAM, "SIZE")
            num = 0
            for k in range(p.vs, p.ve):
                if not (_CLS[s[k]] & K_DIGIT):
                    raise _err(ERR_PARAM, "SIZE")
                num = num * 10 + (s[k] - 48)
            size = num if vn <= 18 else int(_value_bytes(s, &p))
        elif p.kid == P_BODY:
            if p.vs >= 0 and _eq_upper(s + p.vs, vn, "7BIT"):
                body = "7BIT"
            elif p.vs >= 0 and _eq_upper(s + p.vs, vn, "8BITMIME"):
                body = "8BITMIME"
            else:
                raise _err(ERR_PARAM, "BODY")
        elif p.kid == P_SMTPUTF8:
            if p.vs >= 0:
                raise _err(ERR_PARAM, "SMTPUTF8")
            smtputf8 = True
        elif p.kid == P_RET:
            if p.vs >= 0 and _eq_upper(s + p.vs, vn, "FULL"):
                ret = "FULL"
            elif p.vs >= 0 and _eq_upper(s + p.vs, vn, "HDRS"):
                ret = "HDRS"
            else:
                raise _err(ERR_PARAM, "RET")
        elif p.kid == P_ENVID:
            if p.vs < 0 or vn > C_MAX_ENVID or not _xtext_ok(s + p.vs, vn):
                raise _err(ERR_PARAM, "ENVID")
            envid = PyUnicode_DecodeASCII(<const char*>s + p.vs, vn, NULL)
        elif p.kid == P_AUTH:  # RFC 4954 5: xtext or "<>"
            if p.vs < 0 or not (
                (vn == 2 and s[p.vs] == 60 and s[p.vs + 1] == 62) or _xtext_ok(s + p.vs, vn)
            ):
                raise _err(ERR_PARAM, "AUTH")
            auth = PyUnicode_DecodeASCII(<const char*>s + p.vs, vn, NULL)
        else:
            raise ParseError(555, "5.5.4", f"Unsupported option: {_key(s, &p)}")  # 4.1.1.11
    if path.eight and not smtputf8:
        raise _err(ERR_UTF8)
    return MailFrom(address, size, body, smtputf8, ret, envid, auth)


cdef bint _notify_ok(const unsigned char* v, Py_ssize_t n):
    """NEVER, or a list of distinct SUCCESS / FAILURE / DELAY (RFC 3461 4.1)."""
    cdef Py_ssize_t i = 0, j
    cdef unsigned int seen = 0, bit
    if _eq_upper(v, n, "NEVER"):
        return True
    while True:
        j = _find(v, i, n, 44)
        if j < 0:
            j = n
        if _eq_upper(v + i, j - i, "SUCCESS"):
            bit = 1
        elif _eq_upper(v + i, j - i, "FAILURE"):
            bit = 2
        elif _eq_upper(v + i, j - i, "DELAY"):
            bit = 4
        else:
            return False
        if seen & bit:
            return False
        seen |= bit
        if j == n:
            return True
        i = j + 1


def parse_rcpt(arg, bint smtputf8=False) -> RcptTo:
    """Parse the argument of RCPT (``TO:<path> [params]``). ``smtputf8``: the transaction's
    MAIL carried SMTPUTF8, so UTF-8 addresses are allowed (RFC 6531 3.4)."""
    cdef bytes b = _as_bytes(arg)
    cdef const unsigned char* s = <const unsigned char*>PyBytes_AS_STRING(b)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(b)
    cdef Path path
    cdef Param p
    cdef Py_ssize_t i, k, vn, semi
    notify = orcpt = None
    i = _skip_keyword(s, n, "TO:", 3, ERR_RCPT_SYNTAX)
    _parse_path(s, i, n, ERR_RCPT, False, True, &path)
    address = _address(s, &path, ERR_RCPT)
    i = path.next
    _check_params(s, i, n)
    while True:
        i = _next_param(s, i, n, &p)
        if i < 0:
            break
        vn = p.ve - p.vs
        if p.kid == P_NOTIFY:
            if p.vs < 0 or not _notify_ok(s + p.vs, vn):
                raise _err(ERR_PARAM, "NOTIFY")
            notify = _value_bytes(s, &p).upper().decode("ascii")
        elif p.kid == P_ORCPT:
            # orcpt-parameter = "ORCPT=" addr-type ";" xtext (RFC 3461 4.2)
            semi = _find(s, p.vs, p.ve, 59) if p.vs >= 0 else -1
            if semi <= p.vs:
                raise _err(ERR_PARAM, "ORCPT")
            for k in range(p.vs, semi):
                if not (_CLS[s[k]] & K_LETDIG) and s[k] != 45:
                    raise _err(ERR_PARAM, "ORCPT")
            if not _xtext_ok(s + semi + 1, p.ve - semi - 1) and not (
                smtputf8
                and semi - p.vs == 5
                and _eq_upper(s + p.vs, 5, "UTF-8")
            ):
                raise _err(ERR_PARAM, "ORCPT")
            orcpt = PyUnicode_DecodeUTF8(<const char*>s + p.vs, vn, "replace")
        else:
            raise ParseError(555, "5.5.4", f"Unsupported option: {_key(s, &p)}")
    if path.eight and not smtputf8:
        raise _err(ERR_UTF8)
    return RcptTo(address, notify, orcpt)


# --------------------------------------------------------------------------------------
# DATA content and BDAT chunks (RFC 5321 4.1.1.4, 4.5.2; RFC 3030)
# --------------------------------------------------------------------------------------

MODE_UNSTUFF = 0  # DATA: output is the content, dot-stuffing removed
MODE_WIRE = 1  # DATA: output is wire form (dot-stuffed, CRLF), without the final ".\r\n"
MODE_BDAT = 2  # BDAT: no end marker in-band; output is stuffed into wire form

S_BOL = 0  # at the beginning of a line
S_MID = 1  # inside a line
S_CR = 2  # just after a CR; only LF may follow
S_DOT = 3  # a "." at the beginning of a line (DATA only): stuffing or the end marker
S_DOTCR = 4  # ".\r" at the beginning of a line: only LF may follow (end of data)

cdef enum:
    C_UNSTUFF = 0
    C_WIRE = 1
    C_BDAT = 2
    C_BOL = 0
    C_MID = 1
    C_SCR = 2
    C_SDOT = 3
    C_DOTCR = 4

cdef extern from *:
    """
    #define FASTMTA_ONES 0x0101010101010101ULL
    #define FASTMTA_HIGHS 0x8080808080808080ULL
    #define FASTMTA_LFS 0x0A0A0A0A0A0A0A0AULL
    #define FASTMTA_CRS 0x0D0D0D0D0D0D0D0DULL
    """
    const uint64_t ONES "FASTMTA_ONES"
    const uint64_t HIGHS "FASTMTA_HIGHS"
    const uint64_t LFS "FASTMTA_LFS"
    const uint64_t CRS "FASTMTA_CRS"


cdef inline Py_ssize_t _find_crlf(const unsigned char* p, Py_ssize_t i, Py_ssize_t n) nogil:
    """Index of the first CR or LF in p[i:n], or n. Eight bytes per step (a word has a CR or
    LF iff one of its bytes XOR 0x0A / 0x0D is zero: the classic has-zero-byte test)."""
    cdef uint64_t w, x, y
    while i + 8 <= n:
        memcpy(&w, p + i, 8)
        x = w ^ LFS
        y = w ^ CRS
        if ((x - ONES) & ~x & HIGHS) | ((y - ONES) & ~y & HIGHS):
            break
        i += 8
    while i < n:
        if p[i] <= 13 and (p[i] == 13 or p[i] == 10):
            return i
        i += 1
    return n


cdef inline Py_ssize_t _find_eol_nul(const unsigned char* p, Py_ssize_t i, Py_ssize_t n) nogil:
    """Index of the first CR, LF or NUL in p[i:n], or n. Eight bytes per step (a word has
    one iff one of its bytes, or of it XOR 0x0A / 0x0D, is zero: the has-zero-byte test)."""
    cdef uint64_t w, x, y
    while i + 8 <= n:
        memcpy(&w, p + i, 8)
        x = w ^ LFS
        y = w ^ CRS
        if ((x - ONES) & ~x & HIGHS) | ((y - ONES) & ~y & HIGHS) | ((w - ONES) & ~w & HIGHS):
            break
        i += 8
    while i < n:
        if p[i] <= 13 and (p[i] == 13 or p[i] == 10 or p[i] == 0):
            return i
        i += 1
    return n


@cython.final
cdef class DataReader:
    """Message content after DATA (or inside BDAT chunks), incremental. See the twin.

    Output: ``take()`` returns the content as a few large chunks (slices of the input
    between the places where bytes are dropped or inserted); a whole feed that needs no
    change is passed on as the very object fed (no copy)."""

    cdef public Py_ssize_t max_size
    cdef public Py_ssize_t max_line
    cdef public bint normalize
    cdef public int mode
    cdef public bint done
    cdef public Py_ssize_t size  # octets of content without transparency dots
    cdef public bint line_too_long
    cdef public bint nul  # a NUL was seen
    cdef int _state
    cdef Py_ssize_t _line  # octets of the current line so far, as received
    cdef bint _lf  # the previous line ended in a bare LF (normalize): no end marker now
    cdef list _chunks

    def __init__(
        self,
        Py_ssize_t max_size,
        Py_ssize_t max_line=1000,
        bint normalize=False,
        int mode=C_UNSTUFF,
    ):
        self.max_size = max_size
        self.max_line = max_line
        self.normalize = normalize
        self.mode = mode
        self.done = False
        self.size = 0
        self.line_too_long = False
        self.nul = False
        self._state = C_BOL
        self._line = 0
        self._lf = False
        self._chunks = []

    @property
    def too_big(self) -> bool:
        return self.size > self.max_size

    @property
    def error(self):
        """The reply for a content that was read to its end but must be refused."""
        if self.size > self.max_size:
            return ParseError(*ERR_TOO_BIG)
        if self.line_too_long:
            return ParseError(*ERR_DATA_LINE)
        if self.nul:
            return ParseError(*ERR_NUL)
        return None

    def take(self) -> list:
        """Content produced since the last call (nothing once an error is known)."""
        out = self._chunks
        self._chunks = []
        return out

    cdef inline int _emit(self, bytes data, Py_ssize_t a, Py_ssize_t b) except -1:
        """Output data[a:b] (the twin's _emit of a slice)."""
        if b <= a:
            return 0
        self.size += b - a
        if self.size <= self.max_size and not self.line_too_long and not self.nul:
            if a == 0 and b == PyBytes_GET_SIZE(data):
                PyList_Append(self._chunks, data)
            else:
                PyList_Append(
                    self._chunks, PyBytes_FromStringAndSize(PyBytes_AS_STRING(data) + a, b - a)
                )
        elif PyList_GET_SIZE(self._chunks):
            del self._chunks[:]
        return 0

    cdef inline int _emit_const(self, bytes piece) except -1:
        return self._emit(piece, 0, PyBytes_GET_SIZE(piece))

    def feed(self, data) -> int:
        """Scan ``data``; return how many octets belong to the content (for DATA, up to and
        including the final ".\\r\\n"; the rest are the next commands). Raises a fatal
        ParseError on a bare CR or (unless normalizing) a bare LF."""
        if self.done:
            return 0
        cdef bytes d = _as_bytes(data)
        cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(d)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(d)
        cdef Py_ssize_t i = 0, j
        cdef Py_ssize_t out = 0  # start of the pending output span in data
        cdef Py_ssize_t dot_at = -1  # a held-back line-start "." in this chunk (-1: none)
        cdef int state = self._state
        cdef Py_ssize_t line = self._line
        cdef bint lf = self._lf
        cdef Py_ssize_t max_line = self.max_line
        cdef int mode = self.mode
        cdef bint normalize = self.normalize
        cdef unsigned char c
        while i < n:
            if state == C_MID:
                j = _find_eol_nul(p, i, n)
                if j == n:
                    line += n - i
                    i = n
                    if line > max_line:
                        self.line_too_long = True
                    break
                line += j - i + 1
                i = j + 1
                if p[j] == 0:
                    self.nul = True
                    if PyList_GET_SIZE(self._chunks):
                        del self._chunks[:]
                    continue
                if p[j] == C_CR:
                    # fast path: CRLF then an ordinary line start stays in this loop
                    if i + 1 < n and p[i] == C_LF:
                        line += 1
                        if line > max_line:
                            self.line_too_long = True
                        lf = False
                        c = p[i + 1]
                        if c > 13 and c != C_DOT:
                            i += 1
                            line = 0
                            continue
                        i += 1
                        state = C_BOL
                        line = 0
                        continue
                    if line > max_line:
                        self.line_too_long = True
                    state = C_SCR
                    continue
                # bare LF ends a line
                if not normalize:
                    raise _fatal(ERR_BARE_LF)
                line += 1  # stored as CRLF
                if line > max_line:
                    self.line_too_long = True
                self._emit(d, out, j)
                self._emit_const(b"\r\n")
                out = i
                state = C_BOL
                line = 0
                lf = True
                continue
            c = p[i]
            if state == C_BOL:
                if c == C_DOT:
                    i += 1
                    if mode == C_BDAT:
                        # content; the output gets an extra "." before it (not counted)
                        line = 1
                        self._emit(d, out, i - 1)
                        self.size -= 1
                        self._emit_const(b".")
                        out = i - 1
                        state = C_MID
                        if line > max_line:
                            self.line_too_long = True
                        continue
                    line = 0  # a transparency dot (4.5.2) is not part of the line
                    dot_at = i - 1  # held back until we know what it is
                    state = C_SDOT
                    continue
                line = 0
                state = C_MID
                if c == C_CR or c == C_LF:
                    line = 1
                    i += 1
                    if c == C_CR:
                        state = C_SCR
                        continue
                    if not normalize:
                        raise _fatal(ERR_BARE_LF)
                    self._emit(d, out, i - 1)
                    self._emit_const(b"\r\n")
                    out = i
                    state = C_BOL
                    line = 0
                    lf = True
                continue
            if state == C_SCR:
                if c != C_LF:
                    raise _fatal(ERR_BARE_CR)
                line += 1
                i += 1
                if line > max_line:
                    self.line_too_long = True
                state = C_BOL
                line = 0
                lf = False
                continue
            if state == C_SDOT:
                if c == C_CR:
                    state = C_DOTCR
                    line += 1
                    i += 1
                    continue
                if c == C_LF:
                    # ".\n": never the end of data (smuggling); a content line "."
                    if not normalize:
                        raise _fatal(ERR_BARE_LF)
                    if dot_at >= 0:
                        self._emit(d, out, dot_at)
                    i += 1
                    if mode != C_UNSTUFF:
                        self.size -= 1  # the stuffed dot of "..\r\n"
                    self._emit_const(b".\r\n" if mode == C_UNSTUFF else b"..\r\n")
                    out = i
                    state = C_BOL
                    line = 0
                    lf = True
                    continue
                # a stuffed dot: drop it (MODE_UNSTUFF) or keep it (MODE_WIRE)
                if mode == C_UNSTUFF:
                    if dot_at >= 0:
                        self._emit(d, out, dot_at)
                    out = i
                else:
                    self.size -= 1  # kept in wire form, but not part of the message
                    if dot_at < 0:  # the dot ended the previous chunk
                        self._emit_const(b".")
                state = C_MID
                continue
            # state == S_DOTCR
            if c != C_LF:
                raise _fatal(ERR_BARE_CR)
            if dot_at >= 0:
                self._emit(d, out, dot_at)
            i += 1
            if lf:
                # "\n.\r\n": the line before ended in a bare LF, so this is not
                # CRLF.CRLF (smuggling); it is a content line "."
                if mode != C_UNSTUFF:
                    self.size -= 1
                self._emit_const(b".\r\n" if mode == C_UNSTUFF else b"..\r\n")
                out = i
                state = C_BOL
                line = 0
                lf = False
                continue
            self._state = C_BOL
            self._line = 0
            self.done = True
            return i
        if state != C_SDOT and state != C_DOTCR:
            self._emit(d, out, n)
        elif dot_at >= 0:
            self._emit(d, out, dot_at)
        self._state = state
        self._line = line
        self._lf = lf
        return n

    def finish(self) -> None:
        """BDAT LAST: the content is complete. A last line without CRLF gets one (the
        stored message is always whole lines); a dangling CR is a bare CR."""
        if self.mode != C_BDAT or self.done:
            return
        if self._state == C_SCR:
            raise _fatal(ERR_BARE_CR)
        if self._state == C_MID:
            self._emit_const(b"\r\n")
        self._state = C_BOL
        self.done = True


def dot_stuff(body, bint terminate=True) -> bytes:
    """Turn a message from an API caller into wire form (see the twin): line endings to
    CRLF, a leading "." doubled (4.5.2), the last line ended, then ".\\r\\n" if
    ``terminate``. One pass; unchanged runs are copied with memcpy."""
    cdef bytes b = _as_bytes(body)
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(b)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(b)
    cdef Py_ssize_t i = 0, j, o = 0
    cdef bint bol = True
    # worst case: every byte a line end (x2) or a "." line (".\n" -> "..\r\n"), plus ".\r\n"
    cdef object res = PyBytes_FromStringAndSize(NULL, 2 * n + 5)
    cdef PyObject* rp
    cdef unsigned char* q = <unsigned char*>PyBytes_AS_STRING(res)
    while i < n:
        if bol and p[i] == C_DOT:
            q[o] = C_DOT
            o += 1
        j = _find_crlf(p, i, n)
        if j > i:
            memcpy(q + o, p + i, <size_t>(j - i))
            o += j - i
            bol = False
        if j == n:
            break
        q[o] = C_CR
        q[o + 1] = C_LF
        o += 2
        bol = True
        i = j + 2 if (p[j] == C_CR and j + 1 < n and p[j + 1] == C_LF) else j + 1
    if n and not bol:
        q[o] = C_CR
        q[o + 1] = C_LF
        o += 2
    if terminate:
        q[o] = C_DOT
        q[o + 1] = C_CR
        q[o + 2] = C_LF
        o += 3
    # _PyBytes_Resize needs the only reference: move ours into rp, resize, take it back
    Py_INCREF(res)
    rp = <PyObject*>res
    res = None
    _PyBytes_Resize(&rp, o)
    res = <object>rp
    Py_DECREF(res)
    return res


# --------------------------------------------------------------------------------------
# Replies (client side)
# --------------------------------------------------------------------------------------

ERR_REPLY = (451, "4.5.0", "Malformed reply from server")


@cython.final
cdef class ReplyReader:
    """Replies from a server (RFC 5321 4.2), single and multi-line, incremental. See the
    twin: a bare LF ends a line too; a line over ``max_line`` octets or a reply over
    ``max_lines`` lines is an error."""

    cdef public Py_ssize_t max_line
    cdef public Py_ssize_t max_lines
    cdef Buf _b
    cdef int _code
    cdef list _lines

    def __init__(self, Py_ssize_t max_line=2048, Py_ssize_t max_lines=128):
        self.max_line = max_line
        self.max_lines = max_lines
        self._code = 0
        self._lines = []

    def __dealloc__(self):
        PyMem_Free(self._b.data)

    def feed(self, data) -> None:
        cdef bytes d = _as_bytes(data)
        _buf_feed(&self._b, PyBytes_AS_STRING(d), PyBytes_GET_SIZE(d))

    def next_reply(self):
        """The next complete reply, or None until one has arrived. Raises ParseError."""
        cdef const unsigned char* buf
        cdef Py_ssize_t start, lf, end, ln
        cdef int code
        while True:
            buf = <const unsigned char*>self._b.data
            start = self._b.pos
            lf = _find(buf, self._b.scan if self._b.scan > start else start, self._b.len, C_LF)
            if lf < 0:
                if self._b.len - start > self.max_line:
                    raise _err(ERR_REPLY, "line too long")
                self._b.scan = self._b.len
                return None
            self._b.pos = self._b.scan = lf + 1
            end = lf - 1 if lf > start and buf[lf - 1] == C_CR else lf
            if lf + 1 - start > self.max_line:
                raise _err(ERR_REPLY, "line too long")
            ln = end - start
            buf += start
            if (
                ln < 3
                or not (50 <= buf[0] <= 53)
                or not (48 <= buf[1] <= 53)
                or not (48 <= buf[2] <= 57)
                or (ln > 3 and buf[3] != 32 and buf[3] != 45)
            ):
                raise _err(ERR_REPLY, "bad reply line")
            code = (buf[0] - 48) * 100 + (buf[1] - 48) * 10 + buf[2] - 48
            if PyList_GET_SIZE(self._lines) and code != self._code:
                raise _err(ERR_REPLY, "code changed within a reply")
            self._code = code
            PyList_Append(self._lines, PyBytes_FromStringAndSize(<const char*>buf, ln))
            if PyList_GET_SIZE(self._lines) > self.max_lines:
                raise _err(ERR_REPLY, "too many lines")
            if ln > 3 and buf[3] == 45:  # "-": more lines follow
                continue
            lines = self._lines
            self._lines = []
            return _make_reply(code, lines)


cdef Py_ssize_t _enhanced(int code, const unsigned char* text, Py_ssize_t n):
    """Length of an RFC 3463 status code ``class.subject.detail`` at the start of text whose
    class matches the reply code (and the space after it), else 0."""
    cdef Py_ssize_t i, k
    cdef int part
    if n < 5 or text[0] != 48 + code // 100 or text[1] != C_DOT:
        return 0
    i = 2
    for part in range(2):
        k = i
        while i < n and 48 <= text[i] <= 57 and i - k < 3:
            i += 1
        if i == k:
            return 0
        if part == 0:
            if i >= n or text[i] != C_DOT:
                return 0
            i += 1
    if i < n and text[i] != 32:
        return 0
    return i


# RFC 5321 4.2: reply text is HT and printable characters; the other C0 controls and DEL
# become "?" (remote text reaches logs, DSNs and terminals)
_CONTROLS = {c: "?" for c in (*range(9), *range(10, 32), 127)}


cdef object _make_reply(int code, list lines):
    cdef Py_ssize_t k, tn, e, j
    cdef const unsigned char* t
    cdef bint control
    enhanced = None
    texts = []
    for k in range(PyList_GET_SIZE(lines)):
        line = <bytes>lines[k]
        t = <const unsigned char*>PyBytes_AS_STRING(line) + 4
        tn = PyBytes_GET_SIZE(line) - 4
        if tn < 0:
            tn = 0
        e = _enhanced(code, t, tn)
        if e:
            if k == 0:
                enhanced = PyUnicode_DecodeASCII(<const char*>t, e, NULL)
            t += e + 1
            tn -= e + 1
            if tn < 0:
                tn = 0
        control = False
        for j in range(tn):
            if (t[j] < 32 and t[j] != 9) or t[j] == 127:
                control = True
                break
        text = PyUnicode_DecodeUTF8(<const char*>t, tn, "replace")
        PyList_Append(texts, text.translate(_CONTROLS) if control else text)
    return Reply(code, enhanced, tuple(texts))
