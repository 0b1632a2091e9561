"""Subprocess helper for tests/test_spool_crash.py and tests/test_spool_inject.py (not a test).

python tests/spool_crash_helper.py store <dir> <max_messages> <seed>
    Stores messages (bounded: max_messages, 10 s), 64 at a time, printing "S <id>" after
    each store() returned, "d <id>" before done() (the message may be gone from then on) and
        "D <id>" after that done() was flushed (it must be gone). The parent SIGKILLs it.
python tests/spool_crash_helper.py adopt <shard> <incoming>
    Opens a shard, adopts from <incoming> until it is empty, prints "A <id>" per message.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastmta.spool import Envelope, Recipient, Spool, new_queue_id  # noqa: E402


def body_for(queue_id: str) -> bytes:
    """Deterministic wire-form body of a queue id (100 .. 20,000 bytes)."""
    size = 100 + int(queue_id[-6:], 16) * 7919 % 19900
    line = f"X-Id: {queue_id}\r\n".encode()
    return (line * (size // len(line) + 1))[:size]


def envelope_for(queue_id: str) -> Envelope:
    rcpts = [Recipient(f"r{i}-{queue_id}@example.com") for i in range(1 + len(queue_id) % 3)]
    return Envelope(queue_id, f"s-{queue_id}@example.org", rcpts, time.time(), envid=queue_id)


async def store_loop(directory: str, max_messages: int, seed: int) -> None:
    rnd = random.Random(seed)
    sp = Spool(directory, segment_size=256 << 10)
    await sp.open()
    out = sys.stdout
    out.write("READY\n")
    out.flush()
    deadline = time.monotonic() + 10.0
    count = 0
    while count < max_messages and time.monotonic() < deadline:
        ids = [new_queue_id() for _ in range(min(64, max_messages - count))]
        count += len(ids)
        await asyncio.gather(*(sp.store(envelope_for(i), body_for(i)) for i in ids))
        out.write("".join(f"S {i}\n" for i in ids))
        out.flush()
        finished = [i for i in ids if rnd.random() < 0.7]
        out.write("".join(f"d {i}\n" for i in finished))  # intent: may be done from here on
        out.flush()
        for i in finished:
            await sp.done(i)
        await sp.flush()
        out.write("".join(f"D {i}\n" for i in finished))
        out.flush()
    await sp.close()


async def adopt_loop(shard: str, incoming: str) -> None:
    sp = Spool(shard, incoming=incoming, adopt_batch=50)
    adopted = [m.envelope.id for m in await sp.open()]
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        got = await sp.adopt_incoming()
        adopted.extend(m.envelope.id for m in got)
        if not got and not [n for n in os.listdir(incoming) if n.endswith(".msg")]:
            break
    await sp.close()
    sys.stdout.write("".join(f"A {i}\n" for i in adopted))


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "store":
        asyncio.run(store_loop(sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
    elif mode == "adopt":
        asyncio.run(adopt_loop(sys.argv[2], sys.argv[3]))
    else:
        raise SystemExit(f"unknown mode {mode}")
