"""Results and errors shared by the compiled parser (ext/_parse.pyx) and its twin
(fastmta/protocol/_parse_py.py). Both build exactly these objects, so callers and tests
never know which implementation ran."""

from __future__ import annotations

import msgspec


class ParseError(ValueError):
    """Input the parser refuses, with the SMTP reply that says why.

    ``fatal`` means the session must answer and close the connection (a bare CR or LF
    under the ``reject`` policy: the stream can no longer be trusted, RFC 5321 2.3.8)."""

    def __init__(self, code: int, enhanced: str, text: str, fatal: bool = False) -> None:
        super().__init__(f"{code} {enhanced} {text}")
        self.code = code
        self.enhanced = enhanced
        self.text = text
        self.fatal = fatal

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ParseError) and (
            self.code,
            self.enhanced,
            self.text,
            self.fatal,
        ) == (other.code, other.enhanced, other.text, other.fatal)

    def __hash__(self) -> int:
        return hash((self.code, self.enhanced, self.text))


class MailFrom(msgspec.Struct, gc=False):
    """``MAIL FROM:<reverse-path> [params]`` (RFC 5321 4.1.1.2), parameters checked."""

    address: str  # "" for the null reverse-path <>
    size: int | None = None  # RFC 1870
    body: str | None = None  # "7BIT" | "8BITMIME" | "BINARYMIME" (RFC 6152, RFC 3030)
    smtputf8: bool = False  # RFC 6531
    ret: str | None = None  # RFC 3461 4.3: "FULL" | "HDRS"
    envid: str | None = None  # RFC 3461 4.4 (xtext, kept encoded)
    auth: str | None = None  # RFC 4954 5 (xtext, kept encoded)


class RcptTo(msgspec.Struct, gc=False):
    """``RCPT TO:<forward-path> [params]`` (RFC 5321 4.1.1.3), parameters checked."""

    address: str  # "Postmaster" is allowed without a domain (4.1.1.3)
    notify: str | None = None  # RFC 3461 4.1: "NEVER" or a list of SUCCESS,FAILURE,DELAY
    orcpt: str | None = None  # RFC 3461 4.2: "rfc822;user@example" (xtext, kept encoded)


def domain_of(address: str) -> str:
    """The lower-cased domain of ``local@domain`` ("" when there is none)."""
    at = address.rfind("@")
    return address[at + 1 :].lower() if at >= 0 else ""
