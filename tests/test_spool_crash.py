"""Spool crash safety: torn tails at every cut point, garbage tails, and SIGKILL mid-load."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastmta.spool import Envelope, Recipient, Spool, new_queue_id
from fastmta.spool.segment import HEADER, MAGIC, list_segments, scan, segment_name

HELPER = Path(__file__).with_name("spool_crash_helper.py")
_spec = importlib.util.spec_from_file_location("spool_crash_helper", HELPER)
helper = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helper)


def run(coro):
    return asyncio.run(coro)


def make_env() -> Envelope:
    return Envelope(new_queue_id(), "s@example.org", [Recipient("r@example.com")], time.time())


async def _store_three(d: Path, done_first: bool = False) -> list[str]:
    sp = Spool(d, fsync=False)
    await sp.open()
    ids = []
    for i in range(3):
        env = make_env()
        await sp.store(env, f"Subject: {i}\r\n\r\nbody {i}\r\n".encode() * 3)
        ids.append(env.id)
    if done_first:
        await sp.done(ids[0])
    await sp.close()
    return ids


async def _reopen_check(d: Path, expect: list[str]) -> None:
    """Reopen: exactly `expect` live with intact bytes, then the spool takes new writes."""
    sp = Spool(d, fsync=False)
    live = await sp.open()
    assert [m.envelope.id for m in live] == expect
    for i, m in enumerate(live):
        assert sp.read(m).startswith(b"Subject: ")
        assert len(sp.read(m)) == m.envelope.size, i
    env = make_env()
    await sp.store(env, b"after the tear\r\n")
    await sp.close()
    sp = Spool(d, fsync=False)
    live = await sp.open()
    assert [m.envelope.id for m in live] == [*expect, env.id]
    assert sp.read(live[-1]) == b"after the tear\r\n"
    await sp.close()


def _only_segment(d: Path) -> Path:
    (n,) = list_segments(d)
    return d / segment_name(n)


def test_torn_message_record_at_every_cut_point(tmp_path):
    src = tmp_path / "src"
    ids = run(_store_three(src))
    seg = _only_segment(src).read_bytes()
    records, end = scan(seg)
    assert end == len(seg) and len(records) == 3
    last_start = records[2][0]
    for k, cut in enumerate(range(last_start, len(seg))):
        d = tmp_path / f"cut{cut}"
        d.mkdir()
        (d / "00000001.seg").write_bytes(seg[:cut])
        if k % 16 == 0:  # the full reopen/write/reopen cycle on a sample, recovery on all
            run(_reopen_check(d, ids[:2]))
        else:

            async def live_ids(d=d):
                sp = Spool(d, fsync=False)
                got = [m.envelope.id for m in await sp.open()]
                await sp.close()
                return got

            assert run(live_ids()) == ids[:2]
        assert len((d / "00000001.seg").read_bytes()) == last_start  # truncated on disk


def test_torn_done_record_brings_the_message_back(tmp_path):
    """Losing a DONE in a crash means re-delivery (at-least-once), never loss."""
    ids = run(_store_three(tmp_path, done_first=True))
    seg = _only_segment(tmp_path).read_bytes()
    records, _ = scan(seg)
    assert len(records) == 4
    _only_segment(tmp_path).write_bytes(seg[: records[3][0] + 5])
    run(_reopen_check(tmp_path, ids))


@pytest.mark.parametrize(
    "tail",
    [
        "random",
        "zeros",
        "huge-length",
        "bad-crc",
        "flipped-payload",
        "flipped-type",
    ],
)
def test_garbage_tail(tmp_path, tail):
    ids = run(_store_three(tmp_path))
    path = _only_segment(tmp_path)
    seg = path.read_bytes()
    rnd = random.Random(tail)
    expect = ids
    if tail == "random":
        seg += rnd.randbytes(300)
    elif tail == "zeros":  # a crash after the size grew but before the data blocks were written
        seg += bytes(4096)
    elif tail == "huge-length":
        seg += HEADER.pack(MAGIC, 1, 0, 0, 1 << 30, 0) + b"x" * 100
    elif tail == "bad-crc":
        seg += HEADER.pack(MAGIC, 1, 0, 0, 10, 12345) + b"x" * 10
    elif tail == "flipped-payload":  # damage inside the last record: that message is dropped
        last = scan(seg)[0][2][0]
        seg = seg[: last + 40] + bytes([seg[last + 40] ^ 1]) + seg[last + 41 :]
        expect = ids[:2]
    elif tail == "flipped-type":
        last = scan(seg)[0][2][0]
        seg = seg[: last + 4] + bytes([3]) + seg[last + 5 :]
        expect = ids[:2]
    path.write_bytes(seg)
    run(_reopen_check(tmp_path, expect))


def _read_until(fd: int, buf: bytearray, lines: int, deadline: float) -> None:
    """Read the child's stdout into `buf` until it holds `lines` lines, EOF or the deadline."""
    while buf.count(b"\n") < lines and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.05)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                return
            buf += chunk


@pytest.mark.parametrize("trial", range(4))
def test_sigkill_during_load_loses_nothing_acknowledged(tmp_path, trial):
    rnd = random.Random(trial * 7919 + os.getpid())
    env = dict(os.environ, PYTHONPATH=str(HELPER.parent.parent))
    proc = subprocess.Popen(
        [sys.executable, str(HELPER), "store", str(tmp_path), "20000", str(trial)],
        stdout=subprocess.PIPE,
        env=env,
    )
    buf = bytearray()
    try:
        start = time.monotonic()
        _read_until(proc.stdout.fileno(), buf, 1, start + 20)
        assert buf.startswith(b"READY\n"), bytes(buf)
        _read_until(proc.stdout.fileno(), buf, 1 + rnd.randrange(50, 6000), start + 20)
        time.sleep(rnd.random() * 0.05)  # a random moment, most likely mid-group-commit
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        buf += proc.stdout.read()  # what it printed before dying
        proc.wait()
    lines = bytes(buf).split(b"\n")[:-1]  # a last line without its newline was not complete
    stored = [ln[2:].decode() for ln in lines if ln.startswith(b"S ")]
    finishing = {ln[2:].decode() for ln in lines if ln.startswith(b"d ")}  # done() was called
    finished = {ln[2:].decode() for ln in lines if ln.startswith(b"D ")}  # ... and flushed
    assert len(stored) >= 50
    assert proc.returncode == -signal.SIGKILL  # killed mid-load, not finished

    async def check():
        sp = Spool(tmp_path)
        live = await sp.open()
        by_id = {m.envelope.id: m for m in live}
        for qid in stored:
            if qid in finished:
                assert qid not in by_id, "a flushed DONE was lost"
            elif qid not in finishing:
                assert qid in by_id, f"acknowledged message {qid} lost"
        for qid, m in by_id.items():  # every recovered message is whole, printed or not
            assert sp.read(m) == helper.body_for(qid)
            assert m.envelope.sender == f"s-{qid}@example.org"
            assert m.envelope.envid == qid
            assert len(m.envelope.recipients) == 1 + len(qid) % 3
        await sp.close()
        return len(stored), len(finished), len(by_id)

    n_stored, n_done, n_live = run(check())
    print(f"trial {trial}: {n_stored} acknowledged, {n_done} done, {n_live} recovered live")
