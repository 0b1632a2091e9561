"""A bounded TTL cache and single-flight: the two pieces every lookup goes through.

Neither does DNS; :mod:`fastmta.dns.resolver` combines them: look in :class:`TtlCache`, else
join or start the one in-flight fetch for that key in :class:`SingleFlight`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["SingleFlight", "TtlCache"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class TtlCache(Generic[K, V]):
    """Values with an absolute expiry time on ``clock``; at most ``max_entries`` of them.

    Expired entries are removed when looked up. When full, the oldest insertion goes first
    (FIFO: O(1), and under steady load the oldest entry is the nearest to expiry).
    ``get`` and ``put`` do no I/O and never await.
    """

    def __init__(
        self, max_entries: int = 100_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.max_entries = max_entries
        self.clock = clock
        self._entries: dict[K, tuple[V, float]] = {}

    def get(self, key: K) -> tuple[V, float] | None:
        """``(value, expires)`` if ``key`` is cached and not expired, else ``None``."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[1] <= self.clock():
            del self._entries[key]
            return None
        return entry

    def put(self, key: K, value: V, expires: float) -> None:
        """Store ``value`` until ``expires`` (an entry already past it is not stored)."""
        self._entries.pop(key, None)  # re-insert at the end: FIFO order follows the latest put
        if expires <= self.clock():
            return
        while len(self._entries) >= self.max_entries:
            del self._entries[next(iter(self._entries))]
        self._entries[key] = (value, expires)

    def discard(self, key: K) -> None:
        """Forget ``key`` if cached."""
        self._entries.pop(key, None)

    def clear(self) -> None:
        """Forget everything."""
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


class SingleFlight(Generic[K, V]):
    """Concurrent calls for one key share one fetch.

    The fetch runs as its own task, so a caller that is cancelled does not cancel it for
    the others (each waits through ``asyncio.shield``); its result or exception goes to
    every caller. ``joined`` counts the calls that found a fetch already in flight.
    """

    def __init__(self) -> None:
        self._inflight: dict[K, asyncio.Task[V]] = {}
        self.joined = 0

    async def run(self, key: K, fetch: Callable[[], Awaitable[V]]) -> V:
        """Return the result of the fetch in flight for ``key``, starting ``fetch()`` if none."""
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(fetch())
            self._inflight[key] = task
            task.add_done_callback(lambda t: self._done(key, t))
        else:
            self.joined += 1
        return await asyncio.shield(task)

    def _done(self, key: K, task: asyncio.Task[V]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved: no "exception was never retrieved" if all waiters left

    def __len__(self) -> int:
        return len(self._inflight)
