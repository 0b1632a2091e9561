"""A worker takes over the shards of a run that had more workers (shard j goes to worker
j % count), so no message is stranded when `server.workers` shrinks."""

from __future__ import annotations

import asyncio
import os
import time

from fastmta.app import Worker, shard_dir
from fastmta.config import load_config
from fastmta.spool import Spool
from fastmta.spool.records import Envelope, Recipient, new_queue_id
from fastmta.testing.sink import unused_port


def test_orphan_shard_is_absorbed(tmp_path):
    root = str(tmp_path / "spool")

    async def main():
        orphan = Spool(shard_dir(root, 3))
        await orphan.open()
        env = Envelope(new_queue_id(), "a@b.test", [Recipient("c@d.test")], time.time())
        await orphan.store(env, b"Subject: x\r\n\r\nbody\r\n")
        await orphan.close()

        config = load_config(
            None,
            {
                "server": {"spool_dir": root, "hold_delivery": True, "workers": 2},
                "listener": [{"address": f"127.0.0.1:{unused_port()}"}],
            },
        )
        worker = Worker(config, index=1, count=2)  # 3 % 2 == 1: this worker takes shard-3
        await worker.start()
        try:
            (sm,) = worker.engine.messages()
            assert sm.envelope.id == env.id
            assert worker.spool.read(sm) == b"Subject: x\r\n\r\nbody\r\n"
        finally:
            await worker.stop()
        assert not os.path.exists(shard_dir(root, 3))
        again = Spool(shard_dir(root, 1))
        (kept,) = await again.open()
        assert kept.envelope.id == env.id
        await again.close()

    asyncio.run(main())


def test_worker_compacts_sparse_segments(tmp_path, monkeypatch):
    """server.compact_interval: the worker copies the one held message out of a segment of
    finished ones, and the old segment goes."""
    import functools

    import fastmta.app as app
    from fastmta.spool.segment import list_segments

    root = str(tmp_path / "spool")
    shard = shard_dir(root, 0)

    async def fill() -> str:
        sp = Spool(shard, segment_size=16 << 10)
        await sp.open()
        ids = []
        for i in range(30):
            env = Envelope(new_queue_id(), "a@b.test", [Recipient("c@d.test")], time.time())
            env.held = i == 0  # held: stays queued
            await sp.store(env, b"Subject: x\r\n\r\n" + b"y" * 1500 + b"\r\n")
            ids.append(env.id)
        for qid in ids[1:]:
            await sp.done(qid)
        await sp.close()
        return ids[0]

    async def main():
        kept = await fill()
        first = list_segments(shard)[0]
        monkeypatch.setattr(app, "Spool", functools.partial(Spool, segment_size=16 << 10))
        config = load_config(
            None,
            {
                "server": {"spool_dir": root, "hold_delivery": True, "compact_interval": "0.1s"},
                "listener": [{"address": f"127.0.0.1:{unused_port()}"}],
            },
        )
        worker = Worker(config)
        await worker.start()
        try:
            deadline = time.monotonic() + 5
            while first in list_segments(shard):
                assert time.monotonic() < deadline, "segment never compacted"
                await asyncio.sleep(0.05)
            sm = worker.spool.get(kept)
            assert sm.segment != first and worker.spool.read(sm).startswith(b"Subject: x")
        finally:
            await worker.stop()

    asyncio.run(main())
