"""Injection from another process and adoption by running shards (rename-to-claim)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastmta.spool import Envelope, Recipient, Spool, SpoolError, inject, new_queue_id
from fastmta.spool import spool as spool_module

HELPER = Path(__file__).with_name("spool_crash_helper.py")


def make_env(qid: str = "") -> Envelope:
    return Envelope(qid, "s@example.org", [Recipient("r@example.com")], time.time(), auth="app")


def wire(i: int) -> bytes:
    return f"Subject: injected {i}\r\n\r\n..dot-stuffed line {i}\r\n".encode()


def msg_files(d: Path) -> list[str]:
    return [n for n in os.listdir(d) if n.endswith(".msg")] if d.is_dir() else []


def test_inject_while_stopped_is_adopted_at_open(tmp_path):
    ids = [inject(tmp_path, make_env(new_queue_id()), wire(i)) for i in range(5)]
    assert len(msg_files(tmp_path / "incoming")) == 5

    async def main():
        sp = Spool(tmp_path)
        live = await sp.open()
        assert [m.envelope.id for m in live] == ids
        assert [sp.read(m) for m in live] == [wire(i) for i in range(5)]
        assert live[0].envelope.auth == "app" and live[0].envelope.size == len(wire(0))
        assert sp.stats.adopted == 5
        await sp.close()
        assert msg_files(tmp_path / "incoming") == [] and msg_files(tmp_path / "adopting") == []
        sp = Spool(tmp_path)
        assert len(await sp.open()) == 5  # now in the log, adopted exactly once
        await sp.close()

    asyncio.run(main())


def test_inject_while_running(tmp_path):
    async def main():
        sp = Spool(tmp_path)
        await sp.open()
        qid = inject(tmp_path, make_env(), wire(1))  # empty id: inject assigns one
        assert len(qid) == 24
        got = await sp.adopt_incoming()
        assert [m.envelope.id for m in got] == [qid]
        assert sp.read(got[0]) == wire(1)
        assert await sp.adopt_incoming() == []
        await sp.close()

    asyncio.run(main())


def test_crash_between_append_and_unlink_does_not_duplicate(tmp_path, monkeypatch):
    qid = inject(tmp_path, make_env(), wire(1))
    monkeypatch.setattr(spool_module, "unlink_claimed", lambda *a, **k: None)  # "crash"

    async def first():
        sp = Spool(tmp_path)
        assert [m.envelope.id for m in await sp.open()] == [qid]
        await sp.close()

    asyncio.run(first())
    assert msg_files(tmp_path / "adopting") == [qid + ".msg"]  # the leftover claim
    monkeypatch.undo()

    async def second():
        sp = Spool(tmp_path)
        live = await sp.open()
        assert [m.envelope.id for m in live] == [qid]  # once, not twice
        assert sp.stats.adopted == 0
        await sp.close()
        sp = Spool(tmp_path)
        assert len(await sp.open()) == 1
        await sp.close()

    asyncio.run(second())
    assert msg_files(tmp_path / "adopting") == []


def test_damaged_injected_file_is_set_aside(tmp_path):
    good = inject(tmp_path, make_env(), wire(1))
    bad = inject(tmp_path, make_env(), wire(2))
    path = tmp_path / "incoming" / (bad + ".msg")
    path.write_bytes(path.read_bytes()[:-3])

    async def main():
        sp = Spool(tmp_path)
        assert [m.envelope.id for m in await sp.open()] == [good]
        await sp.close()

    asyncio.run(main())
    assert (tmp_path / "adopting" / (bad + ".msg.bad")).exists()


def test_inject_failure_raises_spool_error(tmp_path):
    (tmp_path / "incoming").write_text("not a directory")
    with pytest.raises(SpoolError):
        inject(tmp_path, make_env(), wire(1))


def test_two_shards_race_in_threads_each_message_once(tmp_path):
    root = tmp_path
    ids = {inject(root, make_env(), wire(i), fsync=False) for i in range(300)}

    async def main():
        a = Spool(root / "0", incoming=root / "incoming", fsync=False, adopt_batch=20)
        b = Spool(root / "1", incoming=root / "incoming", fsync=False, adopt_batch=20)
        got: dict[str, list[str]] = {"a": [], "b": []}
        opened = await asyncio.gather(a.open(), b.open())  # open() adopts a first batch too
        got["a"] = [m.envelope.id for m in opened[0]]
        got["b"] = [m.envelope.id for m in opened[1]]

        async def drain(name, sp):
            for _ in range(100):  # bounded
                batch = await sp.adopt_incoming()
                got[name].extend(m.envelope.id for m in batch)
                if not batch and not msg_files(root / "incoming"):
                    return

        await asyncio.gather(drain("a", a), drain("b", b))
        await a.close()
        await b.close()
        return got

    got = asyncio.run(main())
    assert set(got["a"]).isdisjoint(got["b"])
    assert sorted(got["a"] + got["b"]) == sorted(ids)


def test_two_processes_race_each_message_once(tmp_path):
    root = tmp_path
    ids = {inject(root, make_env(), wire(i), fsync=False) for i in range(400)}
    env = dict(os.environ, PYTHONPATH=str(HELPER.parent.parent))
    procs = [
        subprocess.Popen(
            [sys.executable, str(HELPER), "adopt", str(root / s), str(root / "incoming")],
            stdout=subprocess.PIPE,
            env=env,
        )
        for s in ("0", "1")
    ]
    outs = [p.communicate(timeout=30)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    per = [[ln[2:].decode() for ln in o.splitlines() if ln.startswith(b"A ")] for o in outs]
    assert set(per[0]).isdisjoint(per[1])
    assert sorted(per[0] + per[1]) == sorted(ids)

    async def reopen():
        seen = []
        for s in ("0", "1"):
            sp = Spool(root / s, incoming=root / "incoming")
            seen.extend(m.envelope.id for m in await sp.open())
            await sp.close()
        return seen

    assert sorted(asyncio.run(reopen())) == sorted(ids)
