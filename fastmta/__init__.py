"""fastmta: a high-throughput outbound mail transfer agent."""

__version__ = "0.1.0"


def build_kind() -> str:
    """Which compiled modules (ext/) are in use: "accelerated parser and spool I/O", "pure
    Python parser and spool I/O" (FASTMTA_NO_EXTENSIONS=1, or not built), or a mix."""
    from fastmta.protocol.parse import ACCELERATED as parser
    from fastmta.spool.iothread import ACCELERATED as spool_io

    def kind(fast: bool) -> str:
        return "accelerated" if fast else "pure Python"

    if parser == spool_io:
        return f"{kind(parser)} parser and spool I/O"
    return f"{kind(parser)} parser, {kind(spool_io)} spool I/O"
