"""A timer queue for due times of queued messages: O(log n) push and pop, lazy cancel.

A binary heap of entries ``(due, seq, key)`` plus a dict ``key -> live entry``. Cancelling or
rescheduling a key only changes the dict; the old heap entry is skipped when it reaches the
top (it is no longer the live entry of its key). When stale entries outnumber live ones the
heap is rebuilt, so memory stays O(live keys) under constant rescheduling.

Not thread-safe; owned by one event loop. No I/O, no clock reads.
"""

from __future__ import annotations

import heapq
import itertools
import math

__all__ = ["TimerQueue"]

_Entry = tuple[float, int, str]


class TimerQueue:
    """Keys with due times; pop the due ones in (due, insertion) order."""

    def __init__(self) -> None:
        self._heap: list[_Entry] = []
        self._live: dict[str, _Entry] = {}
        self._seq = itertools.count()

    def __len__(self) -> int:
        """Number of scheduled keys (stale heap entries not counted)."""
        return len(self._live)

    def __contains__(self, key: object) -> bool:
        return key in self._live

    def due_of(self, key: str) -> float | None:
        """Due time of ``key``, or None when it is not scheduled."""
        entry = self._live.get(key)
        return None if entry is None else entry[0]

    def push(self, due: float, key: str) -> None:
        """Schedule ``key`` at ``due``; a key already scheduled is moved to the new time."""
        entry = (due, next(self._seq), key)
        self._live[key] = entry
        heapq.heappush(self._heap, entry)
        if len(self._heap) > 2 * len(self._live) + 1024:
            self._compact()

    def cancel(self, key: str) -> bool:
        """Unschedule ``key``; return whether it was scheduled. O(1) (lazy deletion)."""
        return self._live.pop(key, None) is not None

    def pop_due(self, now: float, limit: int = 1000) -> list[str]:
        """Remove and return up to ``limit`` keys with ``due <= now``, earliest first."""
        heap, live = self._heap, self._live
        out: list[str] = []
        while heap and len(out) < limit:
            entry = heap[0]
            if live.get(entry[2]) is not entry:
                heapq.heappop(heap)  # stale: cancelled or rescheduled
                continue
            if entry[0] > now:
                break
            heapq.heappop(heap)
            del live[entry[2]]
            out.append(entry[2])
        return out

    def next_due(self) -> float | None:
        """Earliest due time, or None when empty (drops stale entries from the top)."""
        heap, live = self._heap, self._live
        while heap:
            entry = heap[0]
            if live.get(entry[2]) is entry:
                return entry[0]
            heapq.heappop(heap)
        return None

    def latest(self, n: int, after: float = -math.inf) -> list[tuple[float, str]]:
        """Up to ``n`` (due, key) with the latest due times, all later than ``after``, latest
        first. O(live keys * log n): for the rare moments a queue parks messages on disk."""
        top = heapq.nlargest(n, self._live.values())
        return [(due, key) for due, _, key in top if due > after]

    def _compact(self) -> None:
        self._heap = list(self._live.values())
        heapq.heapify(self._heap)
