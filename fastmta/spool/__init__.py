"""The durable on-disk queue: an append-only, group-committed segment log per shard.

    spool = Spool("/var/spool/fastmta/0", incoming="/var/spool/fastmta/incoming")
    live = await spool.open()                 # recover; returns unfinished messages
    msg = await spool.store(envelope, wire)   # durable when it returns -> answer 250
    wire = spool.read(msg)
    await spool.update(envelope); await spool.done(envelope.id)
    await spool.close()

inject(root, envelope, wire) drops a message in from another process (`fastmta send`).
"""

from .errors import SpoolError
from .inject import inject
from .records import (
    Done,
    Envelope,
    RcptState,
    Recipient,
    RecipientUpdate,
    StoredMessage,
    new_queue_id,
)
from .spool import Spool
from .writer import SpoolStats

__all__ = [
    "Done",
    "Envelope",
    "RcptState",
    "Recipient",
    "RecipientUpdate",
    "Spool",
    "SpoolError",
    "SpoolStats",
    "StoredMessage",
    "inject",
    "new_queue_id",
]
