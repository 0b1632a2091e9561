"""The one place that chooses the spool's I/O thread: the compiled one (ext/_spoolio.pyx, built
into fastmta.spool._io), which writes and syncs without the GIL, when present, else the
pure-Python twin (_io_py). FASTMTA_NO_EXTENSIONS=1 forces the twin, as for the parser."""

from __future__ import annotations

import os

if os.environ.get("FASTMTA_NO_EXTENSIONS", "") in ("1", "true", "yes"):
    from . import _io_py as _impl
else:
    try:
        from . import _io as _impl  # type: ignore[no-redef]
    except ImportError:  # not built
        from . import _io_py as _impl  # type: ignore[no-redef]

ACCELERATED: bool = _impl.ACCELERATED
IoThread = _impl.IoThread
NO_SYNC: int = _impl.NO_SYNC
DATASYNC: int = _impl.DATASYNC
FULLSYNC: int = _impl.FULLSYNC

__all__ = ["ACCELERATED", "DATASYNC", "FULLSYNC", "NO_SYNC", "IoThread"]
