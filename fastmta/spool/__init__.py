"""The durable on-disk queue: an append-only, group-committed segment log per shard.

    spool = Spool("/var/spool/fastmta/0", incoming="/var/spool/fastmta/incoming")
    live = await spool.open()                 # recover; returns unfinished messages
    msg = await spool.store(envelope, wire)   # durable when it returns -> answer 250
    wire = spool.read(msg)
    await spool.update(envelope); await spool.done(envelope.id)
    await spool.close()

inject(root, envelope, wire) drops a message in from another process (`fastmta send`).

Why a segment log (the layout DESIGN.md asks us to explain). One fsync of a small file costs
0.2-0.7 ms on the machines we measure on, so a file per message with its own fsync caps a
server at a few thousand messages/s whatever else it does (Postfix pays 2-3 fsyncs per message).
Here each worker owns a shard: append-only segment files (segment.py: framed, crc-checked
records) written by writer.py, which takes every record queued since its last sync and has
its I/O thread append them with one pwritev and make them durable with one fdatasync (group
commit, with a 2 ms commit_delay under load). A 250 waits for that sync; nothing else does.
The I/O thread (iothread.py) is compiled and never takes the GIL (ext/_spoolio.pyx; the
pure-Python twin does): a Python writer thread cost a busy worker ~9 futex calls and ~4
context switches per message in GIL hand-offs, ~12 % of its CPU. Measured:
60,000-75,000 1 KiB stores/s with fsync on (benchmarks/bench_spool.py, ~55 per fdatasync),
recovery 130,000-150,000 msg/s.

- Records: MESSAGE (envelope + wire-form bytes, sent as stored), UPDATE (recipient states,
  attempts, next attempt, hold, delay warning), DONE, MOVE (see compaction). State changes
  never rewrite message bytes.
- Recovery (recover.py) replays the segments in order. A torn tail (writes never acknowledged)
  fails its crc and is cut. Damage inside a file (segment.salvage) is skipped, not cut: the
  damaged record is lost and logged, its bytes are kept aside, and every sound record after it
  counts. Parked and injected files are read the same way.
- A segment is deleted when none of its messages is live and no older segment its DONE records
  refer to remains (else a finished message would come back).
- Compaction (Spool.compact, run by each worker every server.compact_interval): the few live
  messages of a sparse sealed segment are copied into the active one as MOVE records, so long-
  deferred mail does not keep whole segments on disk for the queue lifetime.
- Injection (inject.py) writes one-record files into incoming/, which a worker adopts.
- Parking (parked.py; Spool.park/unpark): past queue.max_resident queued messages, the engine
  moves the ones due last (and held ones) out of the log and out of memory into batch files
  named by their due time, and loads a file back when it is due and fits. Only the resident
  part of the queue costs memory (its envelopes, for scheduling): flat however long the queue.
  This is Postfix's split of a small active queue in memory and the deferred queue on disk,
  without Postfix's file per message: one fsync per batch.
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
