"""Spool exceptions."""


class SpoolError(Exception):
    """A spool write (or read) failed: disk full, I/O error, spool closed.

    The SMTP server answers such a failure with 452 4.3.1 "insufficient system storage"
    (RFC 5321 section 4.2.3, RFC 3463 section 3.4): the client keeps the message and retries.
    `errno` is set when the cause was an OSError.
    """

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno
