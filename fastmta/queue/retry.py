"""Retry schedule: backoff with jitter, message lifetime, delay warnings.

Pure computation, no I/O, no clock reads: callers pass ``now`` (Unix time).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Protocol

__all__ = ["RetrySchedule", "DEFAULT_INTERVALS", "DEFAULT_MAX_LIFETIME"]

#: Seconds before retry 1, 2, 3, ...; the last one repeats. Roughly Postfix's backoff
#: (minimal_backoff_time 300 s doubling up to maximal_backoff_time 4000 s).
DEFAULT_INTERVALS: tuple[float, ...] = (300.0, 600.0, 1200.0, 2400.0, 4000.0)
#: Give up and bounce after 5 days (RFC 5321 section 4.5.4.1: "at least 4-5 days").
DEFAULT_MAX_LIFETIME = 5 * 86400.0


class _Uniform(Protocol):
    def uniform(self, a: float, b: float, /) -> float: ...


class RetrySchedule:
    """When to retry a deferred delivery, and when to stop.

    ``intervals[i]`` is the base delay before retry ``i + 1``; past the end the last
    interval repeats. Each delay is multiplied by a random factor in
    ``[1 - jitter, 1 + jitter]`` so a large backlog deferred at the same moment (a site outage)
    does not come back all at once. ``rng`` is anything with ``uniform(a, b)`` (the ``random``
    module, a seeded ``random.Random``).
    """

    def __init__(
        self,
        intervals: Sequence[float] = DEFAULT_INTERVALS,
        jitter: float = 0.2,
        max_lifetime: float = DEFAULT_MAX_LIFETIME,
        rng: _Uniform = random,  # type: ignore[assignment]
    ) -> None:
        if not intervals or any(i <= 0 for i in intervals):
            raise ValueError("intervals must be a non-empty list of positive seconds")
        if not 0 <= jitter < 1:
            raise ValueError("jitter must be in [0, 1)")
        if max_lifetime <= 0:
            raise ValueError("max_lifetime must be positive")
        self.intervals = tuple(float(i) for i in intervals)
        self.jitter = jitter
        self.max_lifetime = max_lifetime
        self.rng = rng

    def next_delay(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (1 = the first retry)."""
        if attempt < 1:
            raise ValueError("attempt counts from 1")
        base = self.intervals[min(attempt, len(self.intervals)) - 1]
        if not self.jitter:
            return base
        return base * (1.0 + self.rng.uniform(-self.jitter, self.jitter))

    def next_attempt_at(self, attempt: int, now: float, arrival: float) -> float:
        """Due time of retry ``attempt``, never later than the expiry time.

        Like Postfix, a message gets one last attempt when its lifetime ends instead of
        sleeping past it.
        """
        return min(now + self.next_delay(attempt), arrival + self.max_lifetime)

    def expired(self, arrival: float, now: float) -> bool:
        """True once the message has been queued for ``max_lifetime`` seconds: bounce it."""
        return now - arrival >= self.max_lifetime

    def delay_warning_due(
        self, arrival: float, now: float, warned: bool, delay_warning: float
    ) -> bool:
        """True when a "delayed" DSN should be sent now.

        Once per message (``warned``), after ``delay_warning`` seconds in the queue; 0
        disables warnings (Postfix delay_warning_time). An expired message is bounced
        instead, so it gets no warning.
        """
        if warned or delay_warning <= 0 or self.expired(arrival, now):
            return False
        return now - arrival >= delay_warning
