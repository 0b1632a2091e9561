"""A message half delivered for a while (one destination fast, another stalling) has its
finished recipients recorded: a crash then does not deliver them a second time (Postfix
marks each recipient done as it goes). The common case, every batch back at once, writes no
extra record."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap

from fastmta.spool import RcptState, Spool

HERE = os.path.dirname(os.path.abspath(__file__))

CHILD = textwrap.dedent(
    """
    import asyncio, os, sys
    sys.path[:0] = [{here!r}, {root!r}]
    from delivery_harness import Harness
    from fastmta.testing.sink import Behaviour

    async def main(d):
        sinks = {{"127.0.0.2": Behaviour(), "127.0.0.4": Behaviour(stall_after_data=True)}}
        h = Harness(d, sinks, overrides={{"delivery": {{"data_done_timeout": 30}}}})
        h.start_servers()
        await h.open()
        h.mx("fast.test", (10, "mx.fast.test", "127.0.0.2"))
        h.mx("slow.test", (10, "mx.slow.test", "127.0.0.4"))
        await h.send("s@sender.test", ["a@fast.test", "b@slow.test"])
        await h.until(lambda: h.sinks["127.0.0.2"].count == 1)
        await asyncio.sleep({wait})
        os._exit(0)  # a crash: nothing is flushed or closed

    asyncio.run(main(sys.argv[1]))
    """
)


def _crash_then_read(tmp_path, wait: float) -> dict[str, str]:
    code = CHILD.format(here=HERE, root=os.path.dirname(HERE), wait=wait)
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], timeout=60, check=True)

    async def read() -> dict[str, str]:
        spool = Spool(os.path.join(tmp_path, "spool"), fsync=False)
        (sm,) = await spool.open()
        await spool.close()
        return {r.address: RcptState(r.state).name for r in sm.envelope.recipients}

    return asyncio.run(read())


def test_half_delivered_message_is_recorded_before_a_crash(tmp_path):
    states = _crash_then_read(tmp_path, wait=2.0)
    assert states["a@fast.test"] == "DELIVERED"  # not sent again after the restart
    assert states["b@slow.test"] == "PENDING"  # still in flight: delivered after the restart
