"""Per-site delivery limits from the configuration: [delivery] defaults, [domain."x"] overrides.

A *site* is a set of MX hosts shared by many domains (KumoMTA's "site name"); its limits are
the [delivery] ones. A domain with its own [domain."x"] limits gets a site of its own (see
:meth:`fastmta.delivery.routing.Router.site_key`), so its overrides never throttle other domains.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from fastmta.config import Config
from fastmta.queue.limits import SiteLimits

__all__ = ["limits_for"]


def limits_for(
    config: Config, domain: str | None, clock: Callable[[], float] = time.monotonic
) -> SiteLimits:
    """SiteLimits for a new site first seen through ``domain`` (its overrides win)."""
    d = config.delivery
    max_conn = d.max_connections_per_site
    per_conn = d.messages_per_connection
    rate = d.messages_per_second
    chain = d.chain_transactions
    backlog = d.backlog_per_connection
    chain_wait = d.chain_wait
    policy = config.domain.get(domain.lower().rstrip(".")) if domain else None
    if policy is not None:
        if policy.max_connections is not None:
            max_conn = policy.max_connections
        if policy.messages_per_connection is not None:
            per_conn = policy.messages_per_connection
        if policy.messages_per_second is not None:
            rate = policy.messages_per_second
        if policy.chain_transactions is not None:
            chain = policy.chain_transactions
        if policy.backlog_per_connection is not None:
            backlog = policy.backlog_per_connection
        if policy.chain_wait is not None:
            chain_wait = policy.chain_wait
    return SiteLimits(
        max_conn, per_conn, rate, chain=chain, backlog=backlog, chain_wait=chain_wait, clock=clock
    )
