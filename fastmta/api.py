"""Embedding fastmta in a Python program: one worker on the caller's event loop.

    async with MTA({"server": {"spool_dir": "/var/spool/myapp"},
                    "delivery": {"relayhost": "[smtp.example.net]:587"}}) as mta:
        queue_id = await mta.submit("app@example.org", ["user@example.com"], message_bytes)

``submit`` returns once the message is durable in the spool (the same promise as a 250 over
SMTP); delivery, retries and bounces then run as for mail received over SMTP. Listeners from
the config are started too, so the embedded MTA can also accept SMTP (pass ``listen=False``
to skip them). A message whose From: domain has a ``[[dkim]]`` key is signed before it is
stored, as mail from a trusted SMTP client is.
"""

from __future__ import annotations

import time
from typing import Any

from .aliases import AliasError, Aliases
from .app import Worker
from .config import Config, load_config
from .protocol.errors import ParseError
from .protocol.parse import dot_stuff, parse_mail, parse_rcpt
from .spool.records import Envelope, Recipient, new_queue_id


class MTA:
    """A fastmta worker owned by the caller's event loop (see the module docstring)."""

    def __init__(
        self, config: Config | dict[str, Any] | None = None, *, listen: bool = True
    ) -> None:
        if not isinstance(config, Config):
            config = load_config(None, config or {})
        if not listen:
            import msgspec

            config = msgspec.structs.replace(config, listener=[])
        self.config = config
        self.worker = Worker(config)
        self.aliases = Aliases.from_config(config)

    async def start(self) -> None:
        await self.worker.start()

    async def stop(self) -> None:
        await self.worker.stop()

    async def __aenter__(self) -> MTA:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def submit(self, sender: str, recipients: list[str], message: bytes) -> str:
        """Queue ``message`` (RFC 5322 bytes; CRLF or bare LF line ends) from ``sender`` ("" for
        the null sender) to ``recipients``. Returns the queue id once it is durable. Raises
        ValueError with the SMTP reply text for an address the SMTP server would refuse."""
        if not recipients:
            raise ValueError("no recipients")
        utf8 = not (sender.isascii() and all(r.isascii() for r in recipients))
        try:
            parse_mail(f"FROM:<{sender}>{' SMTPUTF8' if utf8 else ''}".encode())
            for r in recipients:
                parse_rcpt(f"TO:<{r}>".encode(), utf8)
        except ParseError as e:
            raise ValueError(f"{e.code} {e.enhanced} {e.text}") from None
        wire = dot_stuff(message, terminate=False)
        signer = self.worker.dkim.for_message(wire)
        if signer is not None:
            wire = signer.sign(wire) + wire
        try:
            expanded = self.aliases.recipients(Recipient(r) for r in recipients)
        except AliasError as e:
            raise ValueError(" ".join(map(str, e.reply))) from None
        env = Envelope(
            id=new_queue_id(),
            sender=sender,
            recipients=expanded,
            arrival=time.time(),
            body=None if wire.isascii() else "8BITMIME",
            smtputf8=utf8 or not all(r.address.isascii() for r in expanded),
            client="api",
        )
        stored = await self.worker.spool.store(env, wire)
        assert self.worker.engine is not None
        self.worker.received(stored, "api")
        return env.id
