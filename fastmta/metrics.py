"""Prometheus metrics over HTTP (``server.metrics_listen``, off by default), like KumoMTA's
``/metrics``: ``GET /metrics`` answers the text exposition format (version 0.0.4) with each
worker's delivery counters and queue gauges, labelled ``worker="<i>"``.

Worker 0 serves it and asks every worker (itself included) through its control socket
(control.py), so one scrape sees the whole server; a worker that does not answer within two
seconds is left out and ``fastmta_workers_up`` says how many did.
"""

from __future__ import annotations

import asyncio
import logging

from fastmta.control import ControlError, NotRunning, Request, ask_async, worker_sockets

__all__ = ["MetricsServer", "render"]

log = logging.getLogger("fastmta.metrics")

# control "stats" key -> (metric, type, help); counters get the _total suffix
METRICS: dict[str, tuple[str, str, str]] = {
    "delivered": ("fastmta_delivered_recipients", "counter", "Recipients delivered"),
    "deferred": ("fastmta_deferred_recipients", "counter", "Recipient attempts deferred (4xx)"),
    "bounced": ("fastmta_bounced_recipients", "counter", "Recipients bounced (5xx, expired)"),
    "attempts": ("fastmta_delivery_attempts", "counter", "Delivery transactions attempted"),
    "dsns": ("fastmta_dsns_sent", "counter", "Delivery status notifications generated"),
    "connections_opened": ("fastmta_connections_opened", "counter", "SMTP connections opened"),
    "reused": ("fastmta_transactions_reused", "counter", "Transactions over a reused connection"),
    "chained": ("fastmta_transactions_chained", "counter", "Transactions sent with the last dot"),
    "queued": ("fastmta_queued_messages", "gauge", "Messages queued (held ones not counted)"),
    "held": ("fastmta_held_messages", "gauge", "Messages on hold"),
    "parked": ("fastmta_parked_messages", "gauge", "Queued messages parked on disk"),
    "in_memory": ("fastmta_in_memory_messages", "gauge", "Queued messages loaded in memory"),
    "spool": ("fastmta_spool_messages", "gauge", "Messages live in the spool"),
    "spool_truncated_bytes": (
        "fastmta_spool_truncated_bytes",
        "counter",
        "Torn-tail bytes cut off at recovery",
    ),
    "spool_damaged_bytes": (
        "fastmta_spool_damaged_bytes",
        "counter",
        "Bytes of damaged spool records skipped",
    ),
    "spool_write_errors": ("fastmta_spool_write_errors", "counter", "Failed spool writes"),
}
_REQUEST_LIMIT = 8 << 10
_TIMEOUT = 2.0


def render(workers: list[tuple[int, dict]]) -> str:
    """The exposition text for ``(worker index, stats)`` pairs (the control "stats" answer)."""
    out = [
        "# HELP fastmta_workers_up Workers that answered this scrape",
        "# TYPE fastmta_workers_up gauge",
        f"fastmta_workers_up {len(workers)}",
    ]
    for key, (name, kind, text) in METRICS.items():
        full = f"{name}_total" if kind == "counter" else name
        out.append(f"# HELP {full} {text}")
        out.append(f"# TYPE {full} {kind}")
        for index, stats in workers:
            value = stats.get(key)
            if isinstance(value, int | float):
                out.append(f'{full}{{worker="{index}"}} {value}')
    out.append("# HELP fastmta_failures_total Failed delivery attempts by bounce class")
    out.append("# TYPE fastmta_failures_total counter")
    for index, stats in workers:
        failures = stats.get("failures")
        if isinstance(failures, dict):
            for cls, n in sorted(failures.items()):
                out.append(f'fastmta_failures_total{{worker="{index}",class="{cls}"}} {n}')
    return "\n".join(out) + "\n"


class MetricsServer:
    """The HTTP endpoint (one request per connection, HTTP/1.0 or 1.1, GET /metrics)."""

    def __init__(self, listen: tuple[str, int], spool_root: str) -> None:
        self.listen = listen
        self.spool_root = spool_root
        self._server: asyncio.Server | None = None

    async def start(self) -> bool:
        """Listen; False (logged) when the address cannot be bound: the server runs on."""
        host, port = self.listen
        try:
            self._server = await asyncio.start_server(self._serve, host, port, limit=_REQUEST_LIMIT)
        except OSError as e:
            log.error("metrics endpoint %s:%d: %s", host, port, e)
            return False
        log.info("metrics on http://%s:%d/metrics", host, port)
        return True

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def gather(self) -> list[tuple[int, dict]]:
        """Every worker's stats, asked in parallel; the silent ones are left out."""
        sockets = worker_sockets(self.spool_root)
        answers = await asyncio.gather(
            *(ask_async(path, Request("stats"), timeout=_TIMEOUT) for _, path in sockets),
            return_exceptions=True,
        )
        out = []
        for (index, _), lines in zip(sockets, answers, strict=True):
            if isinstance(lines, NotRunning | ControlError | TimeoutError | OSError):
                continue
            if isinstance(lines, BaseException):
                raise lines
            out.append((index, lines[-1].stats))
        return out

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                head = await reader.readuntil(b"\r\n\r\n")
                method, _, rest = head.partition(b" ")
                path = rest.split(b" ", 1)[0].split(b"?", 1)[0]
                if method not in (b"GET", b"HEAD"):
                    status, body = "405 Method Not Allowed", "only GET\n"
                elif path != b"/metrics":
                    status, body = "404 Not Found", "see /metrics\n"
                else:
                    status, body = "200 OK", render(await self.gather())
                data = body.encode()
                writer.write(
                    f"HTTP/1.1 {status}\r\n"
                    "Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
                    f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
                    + (data if method != b"HEAD" else b"")
                )
                await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # a client that went away or sent garbage: nothing to answer
        finally:
            writer.close()
