"""Type stub for fastmta.protocol._parse (compiled from ext/_parse.pyx).

The pure-Python twin fastmta/protocol/_parse_py.py has the same API and behaviour; its
docstrings are the specification. Every class is sans-IO: no I/O, no await.
"""

from typing import Final

from .errors import MailFrom, ParseError, RcptTo
from .replies import Reply

ACCELERATED: Final[bool]

CR: Final = 13
LF: Final = 10
DOT: Final = 46

ERR_LINE_TOO_LONG: Final[tuple[int, str, str]]  # RFC 5321 4.5.3.1.4
ERR_BARE_LF: Final[tuple[int, str, str]]
ERR_BARE_CR: Final[tuple[int, str, str]]
ERR_TOO_BIG: Final[tuple[int, str, str]]  # RFC 1870 6.3
ERR_DATA_LINE: Final[tuple[int, str, str]]  # RFC 5321 4.5.3.1.6
ERR_NUL: Final[tuple[int, str, str]]
ERR_MAIL_SYNTAX: Final[tuple[int, str, str]]
ERR_RCPT_SYNTAX: Final[tuple[int, str, str]]
ERR_SENDER: Final[tuple[int, str, str]]
ERR_RCPT: Final[tuple[int, str, str]]
ERR_PATH_LONG: Final[tuple[int, str, str]]  # RFC 5321 4.5.3.1.3
ERR_LOCAL_LONG: Final[tuple[int, str, str]]  # RFC 5321 4.5.3.1.1
ERR_DOMAIN_LONG: Final[tuple[int, str, str]]  # RFC 5321 4.5.3.1.2
ERR_UTF8: Final[tuple[int, str, str]]  # RFC 6531 3.5
ERR_PARAM: Final[tuple[int, str, str]]
ERR_DUP: Final[tuple[int, str, str]]
ERR_REPLY: Final[tuple[int, str, str]]

MAX_LOCAL: Final = 64  # RFC 5321 4.5.3.1.1
MAX_DOMAIN: Final = 255  # RFC 5321 4.5.3.1.2
MAX_PATH: Final = 256  # RFC 5321 4.5.3.1.3
MAX_ENVID: Final = 100  # RFC 3461 4.4

MODE_UNSTUFF: Final = 0
MODE_WIRE: Final = 1
MODE_BDAT: Final = 2

S_BOL: Final = 0
S_MID: Final = 1
S_CR: Final = 2
S_DOT: Final = 3
S_DOTCR: Final = 4

class LineReader:
    """CRLF-framed command lines (RFC 5321 2.3.8); ``max_line`` counts the CRLF."""

    max_line: int
    normalize: bool
    def __init__(self, max_line: int = 512, normalize: bool = False) -> None: ...
    def feed(self, data: bytes) -> None: ...
    @property
    def buffered(self) -> int: ...
    def take(self) -> bytes: ...
    def readline(self) -> bytes | None:
        """Raises ParseError: non-fatal for an over-long line, fatal for a bare CR or LF."""

def parse_command(line: bytes) -> tuple[str, bytes]: ...
def parse_mail(arg: bytes) -> MailFrom:
    """Raises ParseError."""

def parse_rcpt(arg: bytes, smtputf8: bool = False) -> RcptTo:
    """Raises ParseError."""

class DataReader:
    """DATA content or BDAT chunks, incremental (RFC 5321 4.1.1.4, 4.5.2; RFC 3030)."""

    max_size: int
    max_line: int
    normalize: bool
    mode: int
    done: bool
    size: int
    line_too_long: bool
    nul: bool
    def __init__(
        self,
        max_size: int,
        max_line: int = 1000,
        normalize: bool = False,
        mode: int = 0,
    ) -> None: ...
    @property
    def too_big(self) -> bool: ...
    @property
    def error(self) -> ParseError | None: ...
    def take(self) -> list[bytes]: ...
    def feed(self, data: bytes) -> int:
        """Octets of ``data`` that belong to the content. Raises a fatal ParseError."""

    def finish(self) -> None: ...

def dot_stuff(body: bytes, terminate: bool = True) -> bytes: ...

class ReplyReader:
    """Server replies (RFC 5321 4.2), single and multi-line, incremental."""

    max_line: int
    max_lines: int
    def __init__(self, max_line: int = 2048, max_lines: int = 128) -> None: ...
    def feed(self, data: bytes) -> None: ...
    def next_reply(self) -> Reply | None:
        """Raises ParseError."""
