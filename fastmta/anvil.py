"""Connection counts shared by the worker processes of one listener (Postfix's anvil, without
a server process): the limits ``limits.max_connections`` and ``limits.max_connections_per_ip``
hold for the whole server, not per worker, although SO_REUSEPORT hands each connection to any
worker.

The supervisor makes one :class:`ConnectionCounts` per listener before it forks the workers: an
anonymous shared memory map with one row per worker. A worker writes only its own row (no locks,
no system calls) and reads the sum of all rows; the supervisor zeroes a worker's row before it
starts a replacement, since the connections of a dead worker are gone. Client addresses are
counted in hashed buckets: two addresses that share a bucket share a count, which can only make
the per-address limit stricter, and only when both are near it.
"""

from __future__ import annotations

import mmap
import zlib

__all__ = ["ConnectionCounts", "WorkerCounts"]

BUCKETS = 8192  # per-address buckets per worker row (32 KiB per worker and listener)
_INT = 4  # bytes per counter (C int)


class ConnectionCounts:
    """Counts of one listener across ``workers`` processes (create before forking)."""

    def __init__(self, workers: int, buckets: int = BUCKETS) -> None:
        self.workers = workers
        self.buckets = buckets
        self._stride = buckets + 1  # [total, bucket 0 .. bucket n-1] per worker
        self._map = mmap.mmap(-1, workers * self._stride * _INT)  # MAP_SHARED | MAP_ANONYMOUS
        self._ints = memoryview(self._map).cast("i")

    def reset(self, index: int) -> None:
        """Forget worker ``index``'s connections (it died; its replacement starts at zero)."""
        start = index * self._stride * _INT
        self._map[start : start + self._stride * _INT] = bytes(self._stride * _INT)

    def worker(self, index: int) -> WorkerCounts:
        """The view worker ``index`` counts its connections with."""
        return WorkerCounts(self, index)


class WorkerCounts:
    """One worker's side: :meth:`opened`/:meth:`closed` change its own row; :meth:`total` and
    :meth:`of` read the whole listener's counts."""

    __slots__ = ("_buckets", "_ints", "_row", "_rows", "_shared")

    def __init__(self, shared: ConnectionCounts, index: int) -> None:
        if not 0 <= index < shared.workers:
            raise ValueError(f"worker index {index} out of range 0..{shared.workers - 1}")
        self._shared = shared  # keeps the memory map alive
        self._ints = shared._ints
        self._buckets = shared.buckets
        self._row = index * shared._stride
        self._rows = range(0, shared.workers * shared._stride, shared._stride)

    def _bucket(self, ip: str) -> int:
        return 1 + zlib.crc32(ip.encode()) % self._buckets

    def total(self) -> int:
        """Connections open on this listener, all workers together."""
        ints = self._ints
        return sum(ints[r] for r in self._rows)

    def of(self, ip: str) -> int:
        """Connections open from ``ip`` (or an address hashed alike), all workers together."""
        ints = self._ints
        b = self._bucket(ip)
        return sum(ints[r + b] for r in self._rows)

    def opened(self, ip: str) -> None:
        ints = self._ints
        ints[self._row] += 1
        ints[self._row + self._bucket(ip)] += 1

    def closed(self, ip: str) -> None:
        ints = self._ints
        ints[self._row] -= 1
        ints[self._row + self._bucket(ip)] -= 1
