"""Egress sources: the local addresses delivery connects from ([[egress]], or the single
delivery.source_address), taken in smooth weighted turn (nginx's round robin: with weights 2
and 1 the order is a b a a b a ..., never a burst of one source), one pick per transaction.

Each source has its own connections and limits per site (the pool's site key carries it), as
KumoMTA keeps a ready queue per egress source and site.
"""

from __future__ import annotations

import msgspec

from fastmta.config import Config

__all__ = ["EgressPool", "Source"]


class Source(msgspec.Struct, frozen=True):
    """``address``: local IP to bind (None: the OS chooses); ``helo_name``: EHLO from it."""

    address: str | None
    helo_name: str
    weight: int = 1


class EgressPool:
    """The sources of a configuration; :meth:`next` picks one per transaction."""

    def __init__(self, sources: list[Source]) -> None:
        if not sources:
            raise ValueError("an egress pool needs at least one source")
        self.sources = sources
        self.tagged = len(sources) > 1 or sources[0].address is not None
        self._current = [0] * len(sources)
        self._total = sum(s.weight for s in sources)

    @classmethod
    def from_config(
        cls, config: Config, helo_name: str, only: list[str] | None = None
    ) -> EgressPool:
        """[[egress]] sources (``only`` those addresses, as a [domain."x"] egress list
        names), or the one of delivery.source_address (None: the OS's)."""
        if config.egress:
            return cls(
                [
                    Source(e.address, e.helo_name or helo_name, e.weight)
                    for e in config.egress
                    if only is None or e.address in only
                ]
            )
        return cls([Source(config.delivery.source_address or None, helo_name)])

    def next(self) -> Source:
        sources = self.sources
        if len(sources) == 1:
            return sources[0]
        current = self._current
        best = 0
        for i, s in enumerate(sources):
            current[i] += s.weight
            if current[i] > current[best]:
                best = i
        current[best] -= self._total
        return sources[best]

    def site_key(self, key: str, source: Source) -> str:
        """The pool's site key for ``source``: its own connections and limits per site."""
        return f"{key}@{source.address}" if self.tagged else key
