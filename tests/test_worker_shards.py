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
