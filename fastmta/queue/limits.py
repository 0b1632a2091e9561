"""Per-site delivery limits: a token bucket for message rate, counters for connections.

Pure data structures: no asyncio, no I/O. The clock is injectable (``time.monotonic`` by
default) so tests drive time by hand.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["TokenBucket", "SiteLimits"]

_EPSILON = 1e-9


class TokenBucket:
    """Rate limiter: ``rate`` tokens per second, at most ``burst`` saved up.

    ``rate=0`` means unlimited. ``burst`` defaults to ``max(1, rate)`` (one second's worth).
    The bucket starts full.
    """

    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate < 0:
            raise ValueError("rate must be >= 0 (0 = unlimited)")
        if burst is None:
            burst = max(1.0, rate)
        if burst < 1:
            raise ValueError("burst must be >= 1 or no token could ever be taken")
        self.rate = float(rate)
        self.burst = float(burst)
        self.clock = clock
        self._tokens = self.burst
        self._stamp = clock()

    def try_take(self) -> float:
        """Take one token: return 0.0 when taken, else the seconds until one is available.

        A refusal takes nothing; call again after the returned delay.
        """
        if self.rate == 0:
            return 0.0
        now = self.clock()
        elapsed = now - self._stamp
        self._stamp = now
        if elapsed > 0:
            self._tokens = min(self.burst, self._tokens + elapsed * self.rate)
        # The epsilon absorbs float rounding, so a caller that waits exactly the delay we
        # returned gets its token instead of a second, tiny delay.
        if self._tokens >= 1.0 - _EPSILON:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self.rate


class SiteLimits:
    """Limits and live counters for one destination site.

    ``max_connections`` concurrent connections (default 20, Postfix's
    default_destination_concurrency_limit); ``messages_per_connection`` before a connection
    is retired (0 = unlimited; default 1000); ``messages_per_second`` across the site
    (0 = unlimited), with ``burst`` as in :class:`TokenBucket`; ``chain``: whether the next
    queued message may be sent with the end of the previous one (delivery.chain_transactions);
    ``backlog``: while chaining, at most how many queued messages may wait per working
    connection before another connection is put to work (delivery.backlog_per_connection);
    ``chain_wait``: how long a queued message may be expected to wait for a working connection
    to chain it (delivery.chain_wait): the pool allows ``chain_wait`` / the site's recent
    transaction time of them per connection, 1 to ``backlog``.
    """

    def __init__(
        self,
        max_connections: int = 20,
        messages_per_connection: int = 1000,
        messages_per_second: float = 0.0,
        *,
        chain: bool = True,
        backlog: int = 32,
        chain_wait: float = 0.05,
        burst: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be >= 1")
        if backlog < 1:
            raise ValueError("backlog must be >= 1")
        if chain_wait < 0:
            raise ValueError("chain_wait must be >= 0")
        if messages_per_connection < 0:
            raise ValueError("messages_per_connection must be >= 0 (0 = unlimited)")
        self.max_connections = max_connections
        self.messages_per_connection = messages_per_connection
        self.bucket = TokenBucket(messages_per_second, burst, clock)
        self.chain = chain
        self.backlog = backlog
        self.chain_wait = chain_wait
        self.active = 0

    def can_open(self) -> bool:
        """True when one more connection may be opened."""
        return self.active < self.max_connections

    def opened(self) -> None:
        """Count a connection being opened (call only after :meth:`can_open` said True)."""
        if self.active >= self.max_connections:
            raise RuntimeError("connection limit exceeded; check can_open() first")
        self.active += 1

    def closed(self) -> None:
        """Count a connection closed (or a connection attempt that failed)."""
        if self.active <= 0:
            raise RuntimeError("closed() without a matching opened()")
        self.active -= 1

    def connection_spent(self, sent: int) -> bool:
        """True when a connection that carried ``sent`` messages must not carry more."""
        return 0 < self.messages_per_connection <= sent

    def try_send(self) -> float:
        """Take a rate token for one message: 0.0 when allowed, else seconds to wait."""
        return self.bucket.try_take()
