"""Shared set-up of the delivery tests: a test DNS server on 127.0.0.1, sinks on 127.0.0.2,
127.0.0.3, ... (all on one port, which is ``delivery.port``), a spool, a delivery log and a
DeliveryEngine with short timeouts and a fast retry schedule."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable

from fastmta.config import load_config
from fastmta.delivery.engine import DeliveryEngine
from fastmta.dns import Resolver
from fastmta.log import DeliveryLog
from fastmta.queue.retry import RetrySchedule
from fastmta.spool import Envelope, Recipient, Spool, StoredMessage, new_queue_id
from fastmta.testing.dnsserver import DnsTestServer
from fastmta.testing.sink import Behaviour, Sink, unused_port

BODY = b"Subject: test\r\nFrom: a@sender.test\r\n\r\nhello\r\n..dot line\r\n"


class Harness:
    """``sinks``: {"127.0.0.2": Behaviour(), ...}; ``dead``: addresses with nothing listening
    (they share the port, so connects are refused)."""

    def __init__(
        self,
        tmp_path: os.PathLike[str],
        sinks: dict[str, Behaviour] | None = None,
        *,
        overrides: dict | None = None,
        retry: float = 0.2,
        max_lifetime: float = 3600.0,
    ) -> None:
        self.tmp = os.fspath(tmp_path)
        self.sink_behaviours = sinks if sinks is not None else {"127.0.0.2": Behaviour()}
        self.overrides = overrides or {}
        self.retry = retry
        self.max_lifetime = max_lifetime
        self.sinks: dict[str, Sink] = {}
        self.dns = DnsTestServer()
        self.port = 0

    # sync part (threads) -----------------------------------------------------------------------
    def start_servers(self) -> None:
        self.dns.start()
        hosts = list(self.sink_behaviours)
        self.port = unused_port(hosts[0]) if hosts else unused_port("127.0.0.2")
        for h in hosts:
            self.sinks[h] = Sink(h, self.port, self.sink_behaviours[h]).start()

    def stop_servers(self) -> None:
        for s in self.sinks.values():
            s.stop()
        self.dns.stop()

    def mx(self, domain: str, *hosts: tuple[int, str, str]) -> None:
        """MX records of ``domain``: (preference, host name, address)."""
        self.dns.add_mx(domain, *[(p, name) for p, name, _ in hosts])
        for _, name, ip in hosts:
            self.dns.add_a(name, ip)

    # async part --------------------------------------------------------------------------------
    async def open(self, **engine_kw) -> DeliveryEngine:
        base = {
            "server": {"spool_dir": os.path.join(self.tmp, "spool"), "hostname": "mta.test"},
            "dns": {"nameservers": [self.dns.address], "timeout": 1},
            "delivery": {
                "port": self.port,
                "connect_timeout": 2,
                "greeting_timeout": 2,
                "mail_timeout": 2,
                "rcpt_timeout": 2,
                "data_timeout": 2,
                "data_block_timeout": 2,
                "data_done_timeout": 2,
                "idle_timeout": 2,
            },
            "local": {"maildir_root": os.path.join(self.tmp, "maildir")},
            "queue": {"delay_warning": 0},
        }
        for k, v in self.overrides.items():
            base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
        self.config = load_config(None, base)
        self.spool = Spool(self.config.server.spool_dir, fsync=False)
        recovered = await self.spool.open()
        self.log_path = os.path.join(self.tmp, "delivery.log")
        self.log = DeliveryLog(self.log_path, flush_interval=0.05)
        self.resolver = Resolver([self.dns.address], timeout=1, tries=1, failure_ttl=0.0)
        self.engine = DeliveryEngine(
            self.config,
            self.spool,
            resolver=self.resolver,
            delivery_log=self.log,
            schedule=RetrySchedule([self.retry], 0.0, self.max_lifetime),
            **engine_kw,
        )
        await self.engine.start(recovered)
        return self.engine

    async def close(self) -> None:
        await self.engine.stop(2.0)
        await self.spool.close()
        self.log.close()
        self.resolver.close()

    async def send(
        self, sender: str, rcpts: list[str], data: bytes = BODY, **env_kw
    ) -> StoredMessage:
        """Store a message in the spool and submit it to the engine."""
        recipients = [r if isinstance(r, Recipient) else Recipient(r) for r in rcpts]
        env = Envelope(
            new_queue_id(), sender, recipients, env_kw.pop("arrival", time.time()), **env_kw
        )
        sm = await self.spool.store(env, data)
        self.engine.submit(sm)
        return sm

    async def until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError("condition not met in time")
            await asyncio.sleep(0.01)

    def records(self, outcome: str | None = None) -> list[dict]:
        """The delivery log's attempt lines (``outcome="received"``: its reception lines)."""
        self.log.flush()
        with open(self.log_path, "rb") as f:
            lines = [json.loads(line) for line in f if line.strip()]
        if outcome == "received":
            return [r for r in lines if r["outcome"] == "received"]
        return [r for r in lines if r["outcome"] != "received"]

    def live(self, queue_id: str) -> StoredMessage | None:
        return self.spool.get(queue_id)

    async def __aenter__(self) -> Harness:
        self.start_servers()
        try:
            await self.open()
        except BaseException:
            self.stop_servers()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self.close()
        finally:
            self.stop_servers()
