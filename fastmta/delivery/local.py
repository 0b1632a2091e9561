"""Local delivery: recipients of local domains go to Maildir through a thread executor.

:class:`MaildirDelivery` is synchronous and fsyncs; each job (one message, the recipients of
one local domain) is one executor call, so the event loop never blocks on the disk. Unknown
users bounce (550 5.1.1 / 553 5.1.3 from MaildirDelivery); a file-system error defers
(451 4.3.0, RFC 3463 3.4: mail system full / other mail system status).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging

from fastmta.delivery.maildir import MaildirDelivery, UnknownRecipient
from fastmta.protocol.replies import Reply, reply

__all__ = ["LocalDelivery"]

log = logging.getLogger("fastmta.delivery")

DELIVERED = reply(250, "2.0.0", "Delivered to Maildir")


class LocalDelivery:
    """Async front of MaildirDelivery; ``max_threads`` bounds the concurrent disk writers."""

    def __init__(self, maildir: MaildirDelivery, *, max_threads: int = 4) -> None:
        self.maildir = maildir
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_threads, thread_name_prefix="fastmta-maildir"
        )

    async def deliver(self, recipients: list[str], wire: bytes, sender: str) -> list[Reply]:
        """Deliver ``wire`` to each recipient; one reply per recipient, in order."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor, self._deliver_all, recipients, wire, sender
        )

    def _deliver_all(self, recipients: list[str], wire: bytes, sender: str) -> list[Reply]:
        out: list[Reply] = []
        for rcpt in recipients:
            try:
                self.maildir.deliver(rcpt, wire, return_path=sender)
                out.append(DELIVERED)
            except UnknownRecipient as e:
                code, enhanced, text = e.reply
                out.append(reply(code, enhanced, text))
            except (OSError, ValueError) as e:
                log.error("local delivery to %s failed: %s", rcpt, e)
                out.append(reply(451, "4.3.0", f"Local delivery failed: {e}"))
        return out

    def close(self) -> None:
        self._executor.shutdown(wait=True)
