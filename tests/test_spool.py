"""Spool: round trip, recovery of updates/done, segment lifecycle, group commit, write failures."""

from __future__ import annotations

import asyncio
import errno
import os
import time

import pytest
import uvloop

from fastmta.spool import (
    Envelope,
    RcptState,
    Recipient,
    Spool,
    SpoolError,
    StoredMessage,
    _io_py,
    iothread,
    new_queue_id,
    writer,
)
from fastmta.spool.segment import list_segments

PY_IO = pytest.mark.parametrize("io_thread", ["py"], indirect=True)  # faults go through os.*


@pytest.fixture(autouse=True, params=["c", "py"])
def io_thread(request, monkeypatch):
    """Every spool test runs on the compiled I/O thread and on its pure-Python twin. Tests that
    inject faults by replacing os.pwritev/os.fdatasync run on the twin only (PY_IO): the
    compiled thread calls the kernel directly (its errno path: test_spool_io.py)."""
    if request.param == "c":
        if not iothread.ACCELERATED:
            pytest.skip("the compiled I/O thread is not built")
        monkeypatch.setattr(writer, "IoThread", iothread.IoThread)
    else:
        monkeypatch.setattr(writer, "IoThread", _io_py.IoThread)
    return request.param


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request):
    """Run a coroutine to completion on plain asyncio or on uvloop."""
    factory = uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop

    def _run(coro):
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(coro)

    return _run


def make_env(n_rcpt: int = 2, **kw) -> Envelope:
    rcpts = [Recipient(f"user{i}@example.com", notify="FAILURE,DELAY") for i in range(n_rcpt)]
    return Envelope(new_queue_id(), "sender@example.org", rcpts, time.time(), **kw)


def body(i: int, size: int = 1024) -> bytes:
    line = f"Line {i} of the message body\r\n".encode()
    return (line * (size // len(line) + 1))[:size]


def test_round_trip(tmp_path, run):
    async def main():
        sp = Spool(tmp_path)
        assert await sp.open() == []
        stored = []
        for i in range(20):
            env = make_env(
                i % 3 + 1, body="8BITMIME", ret="HDRS", envid=f"e{i}", client="[127.0.0.1]"
            )
            data = body(i, 100 + i * 37)
            if i % 2:
                sm = await sp.store(env, [data[:10], data[10:50], data[50:]])  # chunks, no join
            else:
                sm = await sp.store(env, data)
            assert sm.length == len(data) == env.size
            assert sp.read(sm) == data
            stored.append((sm, data))
        await sp.close()

        sp = Spool(tmp_path)
        live = await sp.open()
        assert [m.envelope for m in live] == [sm.envelope for sm, _ in stored]  # arrival order
        for m, (_, data) in zip(live, stored, strict=True):
            assert sp.read(m) == data
        await sp.close()

    run(main())


def test_updates_and_done_applied_on_recovery(tmp_path, run):
    async def main():
        sp = Spool(tmp_path)
        await sp.open()
        envs = [make_env(3) for _ in range(6)]
        for i, env in enumerate(envs):
            await sp.store(env, body(i))
        e = envs[1]
        e.recipients[0].state = RcptState.DELIVERED
        e.recipients[1].state = RcptState.DEFERRED
        e.recipients[1].last_reply = "451 4.7.1 try later"
        e.attempts = 2
        e.next_attempt = 12345.5
        await sp.update(e)
        await sp.done(envs[2].id)
        await sp.done(envs[2].id)  # idempotent
        await sp.done(envs[4].id)
        with pytest.raises(KeyError):
            await sp.update(envs[2])  # finished: a caller bug
        await sp.close()  # writes the lazy records

        sp = Spool(tmp_path)
        live = await sp.open()
        ids = [m.envelope.id for m in live]
        assert ids == [envs[i].id for i in (0, 1, 3, 5)]
        got = sp.get(e.id).envelope
        assert [r.state for r in got.recipients] == [1, 3, 0]
        assert got.recipients[1].last_reply == "451 4.7.1 try later"
        assert got.recipients[0].notify == "FAILURE,DELAY"
        assert (got.attempts, got.next_attempt) == (2, 12345.5)
        await sp.close()

    run(main())


def test_rollover_and_segment_deletion(tmp_path, run):
    async def main():
        sp = Spool(tmp_path, segment_size=8 << 10)
        await sp.open()
        stored = [await sp.store(make_env(), body(i, 3000)) for i in range(12)]
        segs = sorted({m.segment for m in stored})
        assert len(segs) >= 4  # ~2 messages per 8 KiB segment
        assert list_segments(tmp_path) == segs
        first = [m for m in stored if m.segment == segs[0]]
        for m in first:
            await sp.done(m.envelope.id)
        await sp.flush()
        assert segs[0] not in list_segments(tmp_path)  # its last message is done: gone
        with pytest.raises(SpoolError):
            sp.read(first[0])
        for m in stored:
            await sp.done(m.envelope.id)
        await sp.close()
        # Everything is done; only the last (active) segment and those with DONE records that
        # the reopen finds dead remain until reopen, which deletes them.
        sp = Spool(tmp_path, segment_size=8 << 10)
        assert await sp.open() == []
        await sp.flush()
        assert list_segments(tmp_path) == []
        await sp.close()

    run(main())


def test_done_records_outlive_the_segments_they_refer_to(tmp_path, run):
    """A dead segment holding the DONE of a message in an older, still-live segment must stay:
    deleting it would bring that finished message back at the next recovery."""

    async def main():
        sp = Spool(tmp_path, segment_size=4 << 10)
        await sp.open()
        a = await sp.store(make_env(), body(0, 1500))
        b = await sp.store(make_env(), body(1, 1500))
        c = await sp.store(make_env(), body(2, 1500))
        d = await sp.store(make_env(), body(3, 1500))
        assert a.segment == b.segment < c.segment == d.segment
        await sp.done(a.envelope.id)  # its DONE lands in c's segment
        await sp.done(c.envelope.id)
        await sp.done(d.envelope.id)  # c's segment is now dead, but refers to a's
        e = await sp.store(make_env(), body(4, 3000))  # rolls: c's segment is no longer active
        assert e.segment > c.segment
        await sp.flush()
        assert c.segment in list_segments(tmp_path)
        await sp.close()
        sp = Spool(tmp_path, segment_size=4 << 10)
        ids = [m.envelope.id for m in await sp.open()]
        assert ids == [b.envelope.id, e.envelope.id]
        await sp.done(b.envelope.id)  # a's segment dies, then c's may go too
        await sp.flush()
        assert a.segment not in list_segments(tmp_path)
        assert c.segment not in list_segments(tmp_path)
        await sp.close()

    run(main())


def test_group_commit_far_fewer_fsyncs_than_messages(tmp_path, run):
    async def main():
        sp = Spool(tmp_path)
        await sp.open()
        envs = [make_env(1) for _ in range(1000)]
        res = await asyncio.gather(*(sp.store(e, body(i)) for i, e in enumerate(envs)))
        assert all(isinstance(r, StoredMessage) for r in res)
        assert sp.stats.messages == 1000
        assert 1 <= sp.stats.fsyncs <= 100, sp.stats
        await sp.close()
        sp = Spool(tmp_path)
        assert len(await sp.open()) == 1000
        await sp.close()

    run(main())


def test_commit_delay_lets_a_trickle_of_stores_share_fsyncs(tmp_path, run):
    """Stores arriving one by one, 1 ms apart (sessions finishing DATA at different times):
    without a commit delay nearly each gets its own fdatasync; with one they share."""

    async def trickle(directory, delay):
        sp = Spool(directory, commit_delay=delay)
        await sp.open()
        pending = []
        for i in range(100):
            pending.append(asyncio.ensure_future(sp.store(make_env(1), body(i))))
            await asyncio.sleep(0.001)
        await asyncio.gather(*pending)
        fsyncs = sp.stats.fsyncs
        await sp.close()
        return fsyncs

    async def main():
        eager = await trickle(tmp_path / "eager", 0.0)
        delayed = await trickle(tmp_path / "delayed", 0.005)
        assert delayed * 2 < eager, (delayed, eager)

    run(main())


def test_fsync_never_on_the_loop_thread(tmp_path, run, monkeypatch, io_thread):
    """The twin's thread calls os.fdatasync/os.fsync; the compiled one calls the kernel itself,
    so there the spy must see no call at all."""
    import threading

    threads = set()

    def spying(real):
        def spy(fd):
            threads.add(threading.get_ident())
            return real(fd)

        return spy

    monkeypatch.setattr(os, "fdatasync", spying(os.fdatasync))
    monkeypatch.setattr(os, "fsync", spying(os.fsync))

    async def main():
        sp = Spool(tmp_path)
        await sp.open()
        await asyncio.gather(*(sp.store(make_env(), body(i)) for i in range(50)))
        await sp.close()
        return threading.get_ident()

    loop_thread = run(main())
    assert loop_thread not in threads
    assert threads if io_thread == "py" else not threads


@PY_IO
@pytest.mark.parametrize("fail_at", ["pwritev", "fdatasync", "short-write"])
def test_write_failure_raises_and_leaves_nothing(tmp_path, run, monkeypatch, fail_at):
    real_pwritev, real_fdatasync = os.pwritev, os.fdatasync
    armed = {"on": False}

    def pwritev(fd, bufs, offset):
        if armed["on"] and fail_at == "pwritev":
            armed["on"] = False
            raise OSError(errno.ENOSPC, "No space left on device")
        if armed["on"] and fail_at == "short-write":
            armed["on"] = False
            first = bytes(bufs[0])
            return real_pwritev(fd, [first[: len(first) // 2]], offset)  # then ENOSPC below
        if fail_at == "short-write" and armed.get("next"):
            armed["next"] = False
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwritev(fd, bufs, offset)

    def fdatasync(fd):
        if armed["on"] and fail_at == "fdatasync":
            armed["on"] = False
            raise OSError(errno.EIO, "Input/output error")
        return real_fdatasync(fd)

    monkeypatch.setattr(os, "pwritev", pwritev)
    monkeypatch.setattr(os, "fdatasync", fdatasync)

    async def main():
        sp = Spool(tmp_path)
        await sp.open()
        good1 = await sp.store(make_env(), body(1))
        await sp.update(good1.envelope)
        await sp.flush()
        armed["on"] = True
        armed["next"] = True
        bad = make_env()
        with pytest.raises(SpoolError) as ei:
            await sp.store(bad, body(2, 5000))
        assert ei.value.errno in (errno.ENOSPC, errno.EIO)
        assert sp.stats.write_errors == 1
        assert sp.get(bad.id) is None  # not indexed either
        await sp.close()
        sp = Spool(tmp_path)
        assert [m.envelope.id for m in await sp.open()] == [good1.envelope.id]
        await sp.close()
        armed["on"] = True
        armed["next"] = True
        sp = Spool(tmp_path)
        await sp.open()
        with pytest.raises(SpoolError):
            await sp.store(bad, body(2, 5000))
        good2 = await sp.store(make_env(), body(3))  # still usable after a failure
        await sp.done(good1.envelope.id)
        await sp.close()
        sp = Spool(tmp_path)
        live = await sp.open()
        assert [m.envelope.id for m in live] == [good2.envelope.id]
        assert sp.read(live[0]) == body(3)
        await sp.close()
        return bad

    run(main())


@PY_IO
def test_failed_done_record_is_retried(tmp_path, run, monkeypatch):
    real_fdatasync = os.fdatasync
    armed = {"on": False}

    def fdatasync(fd):
        if armed["on"]:
            armed["on"] = False
            raise OSError(errno.EIO, "Input/output error")
        return real_fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)

    async def main():
        sp = Spool(tmp_path)
        await sp.open()
        a = await sp.store(make_env(), body(1))
        b = await sp.store(make_env(), body(2))
        armed["on"] = True
        await sp.done(a.envelope.id)
        with pytest.raises(SpoolError):
            await sp.flush()  # the DONE's group failed; it is queued for retry
        await sp.flush()  # retried and durable now
        assert sp.stats.write_errors == 1
        await sp.close()
        sp = Spool(tmp_path)
        assert [m.envelope.id for m in await sp.open()] == [b.envelope.id]
        await sp.close()

    run(main())


@PY_IO
def test_truncate_failure_abandons_segment(tmp_path, run, monkeypatch):
    """If even the cleanup fails, later messages go to a new segment and all stay recoverable."""
    real_fdatasync, real_ftruncate = os.fdatasync, os.ftruncate
    armed = {"on": False}

    def fdatasync(fd):
        if armed["on"]:
            raise OSError(errno.EIO, "Input/output error")
        return real_fdatasync(fd)

    def ftruncate(fd, size):
        if armed["on"]:
            armed["on"] = False
            raise OSError(errno.EIO, "Input/output error")
        return real_ftruncate(fd, size)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    monkeypatch.setattr(os, "ftruncate", ftruncate)

    async def main():
        sp = Spool(tmp_path)
        await sp.open()
        a = await sp.store(make_env(), body(1))
        armed["on"] = True
        with pytest.raises(SpoolError):
            await sp.store(make_env(), body(2))
        b = await sp.store(make_env(), body(3))
        assert b.segment > a.segment
        await sp.close()
        sp = Spool(tmp_path)
        ids = [m.envelope.id for m in await sp.open()]
        assert a.envelope.id in ids and b.envelope.id in ids
        await sp.close()

    run(main())


def test_second_open_of_a_shard_is_refused(tmp_path, run):
    async def main():
        sp = Spool(tmp_path)
        await sp.open()
        with pytest.raises(SpoolError):
            await Spool(tmp_path).open()
        await sp.close()
        other = Spool(tmp_path)
        await other.open()  # released by close
        await other.close()

    run(main())


def test_store_before_open_raises(tmp_path, run):
    async def main():
        with pytest.raises(SpoolError):
            await Spool(tmp_path).store(make_env(), b"x")

    run(main())


def test_queue_ids_unique_and_sorted():
    ids = [new_queue_id() for _ in range(20000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert all(len(i) == 24 and i.isalnum() for i in ids)


def test_writes_during_close_raise_instead_of_hanging(tmp_path, run):
    async def main():
        sp = Spool(tmp_path)
        await sp.open()
        m = await sp.store(make_env(), b"x\r\n")
        closing = asyncio.ensure_future(sp.close())
        await asyncio.sleep(0)  # close() has started
        with pytest.raises(SpoolError):
            await asyncio.wait_for(sp.store(make_env(), b"y\r\n"), 5)
        with pytest.raises(SpoolError):
            await sp.done(m.envelope.id)
        await closing
        sp = Spool(tmp_path)
        assert [x.envelope.id for x in await sp.open()] == [m.envelope.id]
        await sp.close()

    run(main())


async def _sparse_spool(tmp_path, keep_every: int = 5) -> tuple[Spool, dict[str, bytes]]:
    """A spool of small segments where only every ``keep_every``-th message is still live."""
    sp = Spool(tmp_path, segment_size=16 << 10)
    await sp.open()
    stored = [await sp.store(make_env(), body(i, 1500)) for i in range(60)]
    kept = {}
    for i, sm in enumerate(stored):
        if i % keep_every:
            await sp.done(sm.envelope.id)
        else:
            kept[sm.envelope.id] = body(i, 1500)
    await sp.flush()
    return sp, kept


def test_compaction_moves_live_messages_out_of_sparse_segments(tmp_path, run):
    async def main():
        sp, kept = await _sparse_spool(tmp_path)
        before = list_segments(tmp_path)
        assert len(before) >= 5 and all(sp.get(q).segment in before for q in kept)
        env = sp.get(next(iter(kept))).envelope
        env.recipients[0].state, env.attempts = RcptState.DEFERRED, 2  # state to carry along
        await sp.update(env)
        sealed = [q for q in kept if sp.get(q).segment < before[-1]]
        assert await sp.compact(below=0.5) == len(sealed)
        await sp.flush()
        after = list_segments(tmp_path)
        assert not set(after) & set(before[:-1])  # every sparse segment is gone
        for q, data in kept.items():
            assert sp.read(sp.get(q)) == data
        env.recipients[1].state = RcptState.DELIVERED  # an update after the move
        await sp.update(env)
        assert sp.stats.moved == len(sealed)
        await sp.close()

        sp = Spool(tmp_path, segment_size=16 << 10)
        live = {m.envelope.id: m for m in await sp.open()}
        assert set(live) == set(kept)
        for q, data in kept.items():
            assert sp.read(live[q]) == data
        got = live[env.id].envelope
        assert got.attempts == 2 and [r.state for r in got.recipients] == [
            RcptState.DEFERRED,
            RcptState.DELIVERED,
        ]
        await sp.close()

    run(main())


def test_compaction_crash_before_old_segments_are_deleted(tmp_path, run, monkeypatch):
    """The moved copies are durable but the old segments were never unlinked: recovery
    keeps one copy of each message (the moved one) and then deletes the old segments."""

    async def main():
        sp, kept = await _sparse_spool(tmp_path)
        old = list_segments(tmp_path)[:-1]
        monkeypatch.setattr(os, "unlink", lambda path: None)  # the "crash": no unlink happens
        await sp.compact(below=0.5)
        await sp.close()
        monkeypatch.undo()
        assert set(old) <= set(list_segments(tmp_path))  # still there
        sp = Spool(tmp_path, segment_size=16 << 10)
        live = await sp.open()
        assert sorted(m.envelope.id for m in live) == sorted(kept)
        for m in live:
            assert sp.read(m) == kept[m.envelope.id] and m.segment not in old
        await sp.flush()
        assert not set(old) & set(list_segments(tmp_path))
        await sp.close()

    run(main())


def test_done_while_a_message_is_being_moved(tmp_path, run):
    async def main():
        sp, kept = await _sparse_spool(tmp_path)
        moving = [q for q in kept if sp.get(q).segment < list_segments(tmp_path)[-1]]
        task = asyncio.ensure_future(sp.compact(below=0.5))
        deadline = time.monotonic() + 5
        while moving[0] not in sp._moving:  # its MOVE record is submitted, not yet durable
            assert time.monotonic() < deadline and not task.done()
            await asyncio.sleep(0)
        await sp.done(moving[0])
        assert moving[0] in sp._done_while_moving  # its DONE waits for the MOVE record
        await task
        assert not sp._done_while_moving
        await sp.close()
        sp = Spool(tmp_path, segment_size=16 << 10)
        live = {m.envelope.id for m in await sp.open()}
        assert live == set(kept) - {moving[0]}
        await sp.close()

    run(main())


@PY_IO
def test_compaction_write_failure_leaves_messages_where_they_were(tmp_path, run, monkeypatch):
    async def main():
        sp, kept = await _sparse_spool(tmp_path)
        before = {q: sp.get(q).segment for q in kept}
        real = os.pwritev

        def full(fd, bufs, offset):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "pwritev", full)
        assert await sp.compact(below=0.5) == 0
        monkeypatch.setattr(os, "pwritev", real)
        assert {q: sp.get(q).segment for q in kept} == before
        assert not sp._moving  # nothing left half-moved
        for q, data in kept.items():
            assert sp.read(sp.get(q)) == data
        await sp.done(next(iter(kept)))  # a DONE is written as usual afterwards
        await sp.close()
        sp = Spool(tmp_path, segment_size=16 << 10)
        live = {m.envelope.id for m in await sp.open()}
        assert live == set(kept) - {next(iter(kept))}
        await sp.close()

    run(main())


def test_recovered_envelopes_share_sender_and_client_strings(tmp_path, run):
    """Bulk mail repeats sender and client in every queued envelope: one copy in memory."""

    async def main():
        sp = Spool(tmp_path, fsync=False)
        await sp.open()
        for _ in range(3):
            await sp.store(make_env(1, client="[192.0.2.1] mailer.test"), b"x")
        await sp.close()
        sp = Spool(tmp_path, fsync=False)
        a, b, c = (m.envelope for m in await sp.open())
        assert a.sender is b.sender is c.sender and a.client is b.client is c.client
        await sp.close()

    run(main())
