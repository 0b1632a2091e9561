"""The one place that chooses the parser: the compiled module (ext/_parse.pyx, built into
fastmta.protocol._parse) when present, else the pure-Python twin. FASTMTA_NO_EXTENSIONS=1
forces the twin even when the compiled module is installed."""

from __future__ import annotations

import os

if os.environ.get("FASTMTA_NO_EXTENSIONS", "") in ("1", "true", "yes"):
    from . import _parse_py as _impl
else:
    try:
        from . import _parse as _impl  # type: ignore[no-redef]
    except ImportError:  # not built (no compiler, or built with FASTMTA_NO_EXTENSIONS=1)
        from . import _parse_py as _impl  # type: ignore[no-redef]

ACCELERATED: bool = _impl.ACCELERATED
IMPLEMENTATION = "accelerated" if ACCELERATED else "pure Python"

LineReader = _impl.LineReader
DataReader = _impl.DataReader
ReplyReader = _impl.ReplyReader
parse_command = _impl.parse_command
parse_mail = _impl.parse_mail
parse_rcpt = _impl.parse_rcpt
dot_stuff = _impl.dot_stuff
MODE_UNSTUFF = _impl.MODE_UNSTUFF
MODE_WIRE = _impl.MODE_WIRE
MODE_BDAT = _impl.MODE_BDAT

__all__ = [
    "ACCELERATED",
    "IMPLEMENTATION",
    "LineReader",
    "DataReader",
    "ReplyReader",
    "parse_command",
    "parse_mail",
    "parse_rcpt",
    "dot_stuff",
    "MODE_UNSTUFF",
    "MODE_WIRE",
    "MODE_BDAT",
]
