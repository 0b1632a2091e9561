"""Spool recovery from damage inside a segment (a bad sector, a flipped bit), not a torn tail:
the damaged record is lost and logged, every sound record after it is recovered, and the
segment is never cut there. A torn tail is still cut (test_spool_crash.py has the cut points)."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from fastmta.spool import Envelope, RcptState, Recipient, Spool, new_queue_id
from fastmta.spool.recover import recover
from fastmta.spool.segment import (
    HEADER,
    HEADER_SIZE,
    MAGIC,
    frame,
    list_segments,
    salvage,
    scan,
    segment_name,
)

DONE_X = b"\x81\xa2id\xa1x"  # the payload of a DONE record of queue id "x" (msgpack)


def run(coro):
    return asyncio.run(coro)


def make_env() -> Envelope:
    rcpts = [Recipient("r1@example.com"), Recipient("r2@example.com")]
    return Envelope(new_queue_id(), "s@example.org", rcpts, time.time())


def body(i: int) -> bytes:
    return b"Subject: %d\r\n\r\n" % i + b"x" * 1000 + b"\r\n"


async def _store(d: Path, n: int) -> list[str]:
    sp = Spool(d, fsync=False)
    await sp.open()
    ids = []
    for i in range(n):
        env = make_env()
        await sp.store(env, body(i))
        ids.append(env.id)
    await sp.close()
    return ids


async def _reopen(d: Path) -> dict[str, tuple[Envelope, bytes]]:
    """Open the spool: {queue id: (envelope, message bytes)} of the live messages, in order."""
    sp = Spool(d, fsync=False)
    live = await sp.open()
    out = {m.envelope.id: (m.envelope, sp.read(m)) for m in live}
    await sp.close()
    return out


def _segment(d: Path) -> Path:
    (n,) = list_segments(d)
    return d / segment_name(n)


def _flip(path: Path, offset: int) -> None:
    buf = bytearray(path.read_bytes())
    buf[offset] ^= 1
    path.write_bytes(bytes(buf))


def _records(path: Path) -> list[tuple[int, int, memoryview]]:
    records, end = scan(path.read_bytes())
    assert end == path.stat().st_size
    return records


def test_flipped_bit_in_a_message_loses_that_message_only(tmp_path, caplog):
    """The audit's case: one bit of message 3 of 10 used to cut off messages 3 to 9."""
    ids = run(_store(tmp_path, 10))
    seg = _segment(tmp_path)
    records = _records(seg)
    size = seg.stat().st_size
    start, end = records[3][0], records[4][0]
    _flip(seg, start + 500)  # in the message bytes
    with caplog.at_level(logging.ERROR, "fastmta.spool"):
        live = run(_reopen(tmp_path))
    assert list(live) == ids[:3] + ids[4:]
    for i, qid in enumerate(ids):
        if i != 3:
            assert live[qid][1] == body(i)
    assert seg.stat().st_size == size  # nothing cut away
    (msg,) = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert str(seg) in msg and f"at offset {start}" in msg and f"resumes at {end}" in msg
    assert f"MESSAGE record, queue id {ids[3]}" in msg and "not delivered" in msg
    aside = Path(f"{seg}.corrupt-{start}")
    assert aside.read_bytes() == seg.read_bytes()[start:end]  # kept for an operator
    assert list(run(_reopen(tmp_path))) == ids[:3] + ids[4:]  # and again: the same


def test_damaged_header_is_skipped_by_finding_the_next_record(tmp_path):
    """A damaged magic or length: the next record is found by its magic and crc."""
    ids = run(_store(tmp_path, 5))
    seg = _segment(tmp_path)
    records = _records(seg)
    _flip(seg, records[1][0] + 1)  # magic
    _flip(seg, records[3][0] + 9)  # length: points into the middle of the next record
    assert list(run(_reopen(tmp_path))) == [ids[0], ids[2], ids[4]]
    assert seg.stat().st_size == records[-1][0] + HEADER_SIZE + len(records[-1][2])


def test_damage_and_a_torn_tail(tmp_path):
    """Damage inside the file is skipped, the torn tail after it is still cut off."""
    ids = run(_store(tmp_path, 4))
    seg = _segment(tmp_path)
    records = _records(seg)
    _flip(seg, records[1][0] + 300)
    full = seg.read_bytes()
    seg.write_bytes(full[: records[3][0] + 200])  # message 3 torn: never acknowledged
    assert list(run(_reopen(tmp_path))) == [ids[0], ids[2]]
    assert seg.stat().st_size == records[3][0]


def test_damaged_last_record_is_a_torn_tail(tmp_path):
    """No sound record after the damage: a torn tail, truncated on disk as before."""
    ids = run(_store(tmp_path, 3))
    seg = _segment(tmp_path)
    records = _records(seg)
    _flip(seg, records[2][0] + 500)
    assert list(run(_reopen(tmp_path))) == ids[:2]
    assert seg.stat().st_size == records[2][0]
    assert not list(tmp_path.glob("*.corrupt-*"))


async def _store_update_done(d: Path) -> tuple[list[str], Envelope]:
    """Messages 0..3; message 1 gets two updates (r1 delivered, then r2 too); message 2 is
    done. Record order: M0 M1 M2 M3 U1a U1b D2."""
    sp = Spool(d, fsync=False)
    await sp.open()
    envs = [make_env() for _ in range(4)]
    for i, env in enumerate(envs):
        await sp.store(env, body(i))
    envs[1].recipients[0].state = RcptState.DELIVERED
    envs[1].attempts = 1
    await sp.update(envs[1])
    await sp.flush()
    envs[1].recipients[1].state = RcptState.DELIVERED
    envs[1].attempts = 2
    await sp.update(envs[1])
    await sp.flush()
    await sp.done(envs[2].id)
    await sp.close()
    return [e.id for e in envs], envs[1]


def test_damaged_update_leaves_the_last_good_state(tmp_path):
    ids, _ = run(_store_update_done(tmp_path))
    seg = _segment(tmp_path)
    records = _records(seg)
    assert [r[1] for r in records] == [1, 1, 1, 1, 2, 2, 3]
    _flip(seg, records[5][0] + HEADER_SIZE + 2)  # the second update of message 1
    live = run(_reopen(tmp_path))
    assert list(live) == [ids[0], ids[1], ids[3]]
    env = live[ids[1]][0]
    assert [r.state for r in env.recipients] == [RcptState.DELIVERED, 0] and env.attempts == 1


def test_damaged_done_brings_the_message_back(tmp_path):
    ids, _ = run(_store_update_done(tmp_path))
    seg = _segment(tmp_path)
    records = _records(seg)
    seg.write_bytes(seg.read_bytes() + b"".join(frame(3, [DONE_X])))  # a sound record after it
    size = seg.stat().st_size
    _flip(seg, records[6][0] + HEADER_SIZE + 3)  # the DONE of message 2
    assert list(run(_reopen(tmp_path))) == ids  # delivered again: at-least-once
    assert seg.stat().st_size == size


def test_damaged_message_is_not_delivered_despite_its_later_records(tmp_path):
    ids, _ = run(_store_update_done(tmp_path))
    seg = _segment(tmp_path)
    records = _records(seg)
    _flip(seg, records[1][0] + 600)  # message 1's bytes; its two updates are sound
    live = run(_reopen(tmp_path))
    assert list(live) == [ids[0], ids[3]]
    assert live[ids[3]][1] == body(3)


def test_readonly_recovery_changes_nothing(tmp_path):
    ids = run(_store(tmp_path, 4))
    seg = _segment(tmp_path)
    records = _records(seg)
    _flip(seg, records[1][0] + 500)
    seg.write_bytes(seg.read_bytes() + b"torn")
    before = seg.read_bytes()
    rec = recover(str(tmp_path), readonly=True)
    assert list(rec.messages) == [ids[0], ids[2], ids[3]]
    assert seg.read_bytes() == before
    assert not list(tmp_path.glob("*.corrupt-*"))


def _junk_then_record(candidates: int) -> tuple[bytes, bytes, bytes]:
    """A sound record, `candidates` fake headers each claiming every byte up to the end of the
    buffer (so each costs a crc over the rest), and a sound record."""
    good = b"".join(frame(3, [DONE_X]))
    size = 2 * len(good) + HEADER_SIZE * candidates
    junk = b"".join(
        HEADER.pack(MAGIC, 1, 0, 0, size - len(good) - HEADER_SIZE * (i + 1), 0)
        for i in range(candidates)
    )
    return good, junk, good + junk + good


def test_salvage_search_is_bounded():
    """Candidates past the budget: the search gives up and the rest is one damaged span, not a
    torn tail (so nothing is truncated); within it, the record after the junk is found."""
    good, junk, buf = _junk_then_record(1000)
    records, spans, end = salvage(buf, budget=100_000)
    assert [r[0] for r in records] == [0] and spans == [(len(good), len(buf))] and end == len(buf)
    good, junk, buf = _junk_then_record(20)
    records, spans, end = salvage(buf)
    assert [r[0] for r in records] == [0, len(good) + len(junk)] and end == len(buf)
    assert spans == [(len(good), len(good) + len(junk))]
