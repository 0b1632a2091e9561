"""Parking: a queue bigger than queue.max_resident keeps the rest on disk (spool/parked.py),
and every parked message is still delivered, listed and changed by operators."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
from delivery_harness import BODY, Harness

from fastmta.spool import Envelope, Recipient, Spool
from fastmta.spool.parked import (
    CHANGES,
    HELD_DUE,
    LOADING,
    PARKED,
    PENDING,
    REPLACING,
    ParkedFile,
    envelopes,
    list_parked,
    read_parked,
    rewrite_parked,
    settle,
    unsettled,
    write_parked,
)
from fastmta.testing.sink import Behaviour


def env(qid: str, due: float = 0.0, held: bool = False) -> Envelope:
    return Envelope(qid, "a@x.test", [Recipient(f"{qid}@y.test")], 1.0, next_attempt=due, held=held)


# ------------------------------------------------------------------------------ parked files


def test_write_list_read_round_trip(tmp_path):
    d = str(tmp_path)
    items = [(env("q1", 50.5), b"one\r\n"), (env("q2", 20.25, held=False), b"two\r\n")]
    items[1][0].recipients[0].state = 3
    pf = write_parked(d, items, fsync=False)
    assert pf == ParkedFile(pf.name, 20250, 2) and pf.due == 20.25
    assert pf.name == "0000000020250-000002-q1.park"
    held = write_parked(d, [(env("q3", 5.0, held=True), b"x")], fsync=False)
    assert held.due_ms == HELD_DUE and held.due == float("inf")
    open(os.path.join(d, PARKED, ".crashed.park.tmp"), "wb").close()
    assert list_parked(d) == [pf, held]  # earliest due first; the torn tmp file is gone
    assert os.listdir(os.path.join(d, PARKED)).count(".crashed.park.tmp") == 0
    got = read_parked(d, pf.name)
    assert [(e.id, e.next_attempt, e.recipients[0].state, b) for e, b in got] == [
        ("q1", 50.5, 0, b"one\r\n"),
        ("q2", 20.25, 3, b"two\r\n"),
    ]
    assert read_parked(d, "0000000000000-000001-gone.park") is None
    # envelopes() reads headers and envelopes only; a big envelope takes a second read
    big = env("q9", 30.0)
    big.recipients = [Recipient(f"user{i}@example.test") for i in range(100)]
    pf3 = write_parked(d, [(env("q8", 30.0), b"small\r\n"), (big, b"big body\r\n")], fsync=False)
    with open(os.path.join(d, PARKED, pf3.name), "rb") as f:
        raw = f.read()
    got = [(e.id, len(e.recipients), raw[o : o + n]) for e, o, n in envelopes(d, pf3.name)]
    assert got == [("q8", 1, b"small\r\n"), ("q9", 100, b"big body\r\n")]


def test_damaged_file_is_set_aside_with_its_sound_records(tmp_path):
    d = str(tmp_path)
    pf = write_parked(d, [(env("q1"), b"a" * 100), (env("q2"), b"b" * 100)], fsync=False)
    path = os.path.join(d, PARKED, pf.name)
    with open(path, "r+b") as f:
        f.seek(-5, os.SEEK_END)
        f.write(b"XXXXX")  # the second record fails its crc
    got = read_parked(d, pf.name)
    assert [e.id for e, _ in got] == ["q1"]
    assert os.path.exists(path + ".bad") and list_parked(d) == []


def test_rewrite_applies_operator_changes(tmp_path):
    d = str(tmp_path)
    pf = write_parked(d, [(env("q1", 100.0), b"1"), (env("q2", 200.0), b"2")], fsync=False)
    new, ids = rewrite_parked(d, pf.name, lambda e: False, fsync=False)
    assert (new, ids) == (pf, [])  # nothing named: the file is untouched
    new, ids = rewrite_parked(
        d, pf.name, lambda e: CHANGES["hold"](e) if e.id == "q1" else False, fsync=False
    )
    assert ids == ["q1"] and new.due == 200.0 and list_parked(d) == [new]
    assert os.listdir(os.path.join(d, PARKED)) == [new.name]  # nothing half done left
    new2, ids = rewrite_parked(d, new.name, CHANGES["flush"], fsync=False)
    assert ids == ["q1", "q2"] and new2.due == 0.0  # the held one is not due
    got = {e.id: (e.held, e.next_attempt) for e, _ in read_parked(d, new2.name)}
    assert got == {"q1": (True, 100.0), "q2": (False, 0.0)}
    new3, ids = rewrite_parked(d, new2.name, CHANGES["delete"], fsync=False)
    assert new3 is None and ids == ["q1", "q2"] and list_parked(d) == []


def test_a_crash_in_an_operator_change_parks_each_message_once(tmp_path):
    d = str(tmp_path)
    a = write_parked(d, [(env("a1", 100.0), b"1"), (env("a2", 200.0), b"2")], fsync=False)
    b = write_parked(d, [(env("b1", 300.0), b"3")], fsync=False)
    # the change of file a was written, the crash came before a was removed: undone
    write_parked(d, [(env("a2", 200.0), b"2")], fsync=False, suffix=REPLACING + a.name)
    # the change of file b got as far as removing b: done
    b2 = write_parked(d, [(env("b1", 0.0), b"3")], fsync=False, suffix=REPLACING + b.name)
    os.unlink(os.path.join(d, PARKED, b.name))
    assert unsettled(d, view=True) == [b2.name + REPLACING + b.name]
    assert settle(d, set(), fsync=False) == 2
    assert list_parked(d) == sorted([a, b2])
    assert sorted(os.listdir(os.path.join(d, PARKED))) == sorted([a.name, b2.name])


# ------------------------------------------------------------------------------------ spool


def test_spool_park_and_unpark_keep_state_across_restarts(tmp_path):
    async def main():
        sp = Spool(str(tmp_path), fsync=False)
        await sp.open()
        stored = []
        for i in range(5):
            e = env(f"m{i}", due=time.time() + 60)
            stored.append(await sp.store(e, BODY + str(i).encode()))
        stored[0].envelope.attempts = 2
        stored[0].envelope.recipients[0].last_reply = "451 4.7.1 later"
        await sp.update(stored[0].envelope)
        pf = await sp.park(stored[:3])
        assert pf.count == 3 and sp.parked_count == 3 and len(sp) == 2
        assert sp.get("m0") is None and sp.next_parked == pf
        await sp.close()

        sp = Spool(str(tmp_path), fsync=False)
        live = await sp.open()
        assert sorted(m.envelope.id for m in live) == ["m3", "m4"]
        assert sp.parked_count == 3
        back = await sp.unpark(sp.next_parked)
        assert sorted(m.envelope.id for m in back) == ["m0", "m1", "m2"]
        m0 = sp.get("m0")
        assert (m0.envelope.attempts, m0.envelope.recipients[0].last_reply) == (
            2,
            "451 4.7.1 later",
        )
        assert sp.read(m0) == BODY + b"0"
        assert sp.parked_count == 0 and list_parked(str(tmp_path)) == []
        await sp.close()

        sp = Spool(str(tmp_path), fsync=False)
        assert len(await sp.open()) == 5  # the loaded copies are in the log
        await sp.close()

    asyncio.run(main())


def test_unpark_skips_a_message_still_live_in_the_log(tmp_path):
    """A crash after the parked file was written and before its DONE records: the message
    is in both places; loading the file must not make two of it."""

    async def main():
        sp = Spool(str(tmp_path), fsync=False)
        await sp.open()
        sm = await sp.store(env("dup"), b"body")
        write_parked(str(tmp_path), [(sm.envelope, b"body")], fsync=False)  # no DONE
        await sp.close()
        sp = Spool(str(tmp_path), fsync=False)
        assert len(await sp.open()) == 1 and sp.parked_count == 1
        assert await sp.unpark(sp.next_parked) == []
        assert len(sp) == 1 and sp.parked_count == 0
        await sp.close()

    asyncio.run(main())


def test_a_crash_while_parking_or_loading_leaves_each_message_in_one_place(tmp_path):
    """The files a crash can leave: ``.pending`` (written, DONE records maybe not durable)
    and ``.loading`` (being stored back). The next open keeps parked exactly the messages
    that are not live in the log."""

    async def main():
        d = str(tmp_path)
        sp = Spool(d, fsync=False)
        await sp.open()
        sms = {f"m{i}": await sp.store(env(f"m{i}"), b"body %d" % i) for i in range(6)}
        # m0, m1: parked, crash before their DONE records; m2, m3: after them
        write_parked(d, [(sms[q].envelope, b"x") for q in ("m0", "m1", "m2", "m3")],
                     fsync=False, suffix=PENDING)  # fmt: skip
        await sp.done("m2")
        await sp.done("m3")
        # m4 stored back from a file being loaded, m5 not yet
        loading = write_parked(d, [(sms["m4"].envelope, b"4"), (env("m9"), b"9")], fsync=False)
        os.rename(
            os.path.join(d, PARKED, loading.name), os.path.join(d, PARKED, loading.name + LOADING)
        )
        await sp.close()

        sp = Spool(d, fsync=False)
        live = {m.envelope.id for m in await sp.open()}
        parked = sorted([e.id async for e in sp.parked_messages()])
        assert live == {"m0", "m1", "m4", "m5"} and parked == ["m2", "m3", "m9"]
        assert sorted(os.listdir(os.path.join(d, PARKED))) == [pf.name for pf in sp._parked]
        await sp.close()

    asyncio.run(main())


def test_spool_change_list_and_read_parked(tmp_path):
    async def main():
        sp = Spool(str(tmp_path), fsync=False)
        await sp.open()
        sms = [await sp.store(env(f"p{i}", time.time() + 60), b"b%d" % i) for i in range(4)]
        await sp.park(sms[:2])
        await sp.park(sms[2:])
        assert [e.id async for e in sp.parked_messages()] == ["p0", "p1", "p2", "p3"]
        assert await sp.parked_message("p3") == (sms[3].envelope, b"b3")
        assert await sp.parked_message("nope") is None
        assert await sp.change_parked(CHANGES["delete"], {"p1", "nope"}) == ["p1"]
        assert await sp.change_parked(CHANGES["hold"], {"p2"}) == ["p2"]
        assert sp.parked_count == 3
        held = {e.id: e.held async for e in sp.parked_messages()}
        assert held == {"p0": False, "p2": True, "p3": False}
        await sp.close()

    asyncio.run(main())


# ----------------------------------------------------------------------------------- engine


def queue(max_resident: int, batch: int) -> dict:
    return {"queue": {"max_resident": max_resident, "park_batch": batch}}


def resident(h: Harness) -> int:
    return len(h.engine.scheduler) + len(h.engine._held)


def test_held_backlog_is_parked_and_all_delivered_once_released(tmp_path):
    async def main():
        h = Harness(tmp_path, overrides=queue(50, 10))
        async with h:
            h.mx("example.test", (10, "mx1.example.test", "127.0.0.2"))
            h.engine.hold = True
            for i in range(300):
                await h.send("a@sender.test", [f"u{i}@example.test"])
            await h.until(lambda: resident(h) <= 50 and not h.engine._balancing)
            st = h.engine.stats
            assert st.queued == 300 and st.parked >= 250 and len(h.spool) <= 50
            assert len(list_parked(h.config.server.spool_dir)) >= 25
            h.engine.hold = False
            peak = 0
            deadline = time.monotonic() + 30
            while h.sinks["127.0.0.2"].count < 300:
                peak = max(peak, resident(h))
                assert time.monotonic() < deadline, h.engine.stats
                await asyncio.sleep(0.005)
            await h.until(lambda: h.engine.stats.queued == 0)
            assert peak <= 50
            got = sorted(m.recipients[0] for m in h.sinks["127.0.0.2"].messages)
            assert got == sorted(f"u{i}@example.test" for i in range(300))  # each once
            assert h.spool.parked_count == 0

    asyncio.run(main())


def test_parking_picks_the_messages_due_last(tmp_path):
    async def main():
        h = Harness(tmp_path, overrides=queue(20, 5))
        async with h:
            h.mx("example.test", (10, "mx1.example.test", "127.0.0.2"))
            h.engine.hold = True
            later = time.time() + 3600
            for i in range(20):
                await h.send("a@sender.test", [f"later{i}@example.test"], next_attempt=later)
            for i in range(10):
                await h.send("a@sender.test", [f"now{i}@example.test"])
            await h.until(lambda: resident(h) <= 20 and not h.engine._balancing)
            assert h.spool.parked_count >= 10
            h.engine.hold = False
            sink = h.sinks["127.0.0.2"]
            await h.until(lambda: sink.count == 10)
            assert all(m.recipients[0].startswith("now") for m in sink.messages)
            parked = [e.recipients[0].address async for e in h.spool.parked_messages()]
            assert all(a.startswith("later") for a in parked)

    asyncio.run(main())


def test_flushed_parked_files_swap_with_later_resident_messages(tmp_path):
    """Parked files made due by `queue flush` are loaded although memory is full of messages
    due later: those are parked in their place."""

    async def main():
        h = Harness(tmp_path, overrides=queue(30, 10))
        async with h:
            h.mx("example.test", (10, "mx1.example.test", "127.0.0.2"))
            later = time.time() + 3600
            for i in range(100):
                await h.send("a@sender.test", [f"u{i}@example.test"], next_attempt=later + i)
            await h.until(lambda: resident(h) <= 30 and not h.engine._balancing)
            parked_ids = {e.id async for e in h.spool.parked_messages()}
            assert len(parked_ids) == 100 - resident(h) >= 70
            assert sorted(await h.engine.change_parked("flush")) == sorted(parked_ids)
            sink = h.sinks["127.0.0.2"]
            await h.until(lambda: sink.count == len(parked_ids), timeout=20)
            await asyncio.sleep(0.2)
            assert sink.count == len(parked_ids)  # the ones not flushed wait for their time
            assert h.engine.stats.queued == 100 - len(parked_ids)

    asyncio.run(main())


def test_deferred_mail_is_parked_then_retried_and_delivered(tmp_path):
    async def main():
        gate = {"open": False}

        def rcpt(address: str):
            from fastmta.protocol.replies import reply

            return None if gate["open"] else reply(451, "4.7.1", "later")

        h = Harness(
            tmp_path, {"127.0.0.2": Behaviour(rcpt_reply=rcpt)}, overrides=queue(20, 5), retry=0.5
        )
        async with h:
            h.mx("example.test", (10, "mx1.example.test", "127.0.0.2"))
            for i in range(60):
                await h.send("a@sender.test", [f"u{i}@example.test"])
            await h.until(lambda: h.engine.stats.deferred >= 60 and h.spool.parked_count > 0)
            gate["open"] = True
            sink = h.sinks["127.0.0.2"]
            await h.until(lambda: sink.count == 60, timeout=30)
            await h.until(lambda: h.engine.stats.queued == 0)
            assert len({m.recipients[0] for m in sink.messages}) == 60
            assert h.spool.stats.parked > 0 and h.spool.stats.unparked > 0

    asyncio.run(main())


def test_restart_with_parked_mail_delivers_everything_once(tmp_path):
    async def main():
        h = Harness(tmp_path, overrides=queue(40, 10))
        h.start_servers()
        try:
            h.mx("example.test", (10, "mx1.example.test", "127.0.0.2"))
            h.overrides["server"] = {"hold_delivery": True}
            await h.open()
            for i in range(200):
                await h.send("a@sender.test", [f"u{i}@example.test"])
            await h.until(lambda: resident(h) <= 40 and not h.engine._balancing)
            await h.close()

            h.overrides["server"] = {"hold_delivery": False}
            await h.open()
            assert len(h.spool) <= 40 and h.engine.stats.queued == 200
            sink = h.sinks["127.0.0.2"]
            await h.until(lambda: sink.count == 200, timeout=30)
            await h.until(lambda: h.engine.stats.queued == 0)
            assert len({m.recipients[0] for m in sink.messages}) == 200
            await h.close()
        finally:
            h.stop_servers()

    asyncio.run(main())


def test_operator_commands_reach_parked_messages(tmp_path):
    async def main():
        h = Harness(tmp_path, overrides=queue(10, 5))
        async with h:
            h.mx("example.test", (10, "mx1.example.test", "127.0.0.2"))
            later = time.time() + 3600
            sms = [
                await h.send("a@sender.test", [f"u{i}@example.test"], next_attempt=later + i)
                for i in range(30)
            ]
            await h.until(lambda: resident(h) <= 10 and not h.engine._balancing)
            parked = [e async for e in h.spool.parked_messages()]
            parked.sort(key=lambda e: e.next_attempt)
            last, gone = parked[-1].id, parked[-2].id
            assert h.spool.get(last) is None
            ids = {sm.envelope.id for sm in sms}
            assert await h.engine.change_parked("hold", {last}) == [last]
            assert await h.engine.change_parked("delete", {gone}) == [gone]
            assert h.engine.stats.queued == 29
            listed = {sm.envelope.id for sm in h.engine.messages()}
            listed |= {e.id async for e in h.spool.parked_messages()}
            assert listed == ids - {gone}
            assert await h.engine.change_parked("release", {last}) == [last]
            sink = h.sinks["127.0.0.2"]
            await h.until(lambda: sink.count == 1)  # released: due at once
            assert sink.messages[0].recipients == [parked[-1].recipients[0].address]

    asyncio.run(main())


@pytest.mark.parametrize("bad", [{"max_resident": 1}, {"park_batch": 0}])
def test_config_limits(bad):
    from fastmta.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="queue."):
        load_config(None, {"queue": bad})


def test_held_messages_are_parked_until_released(tmp_path):
    async def main():
        h = Harness(tmp_path, overrides=queue(10, 5))
        async with h:
            h.mx("example.test", (10, "mx1.example.test", "127.0.0.2"))
            for i in range(20):
                await h.send("a@sender.test", [f"held{i}@example.test"], held=True)
            await h.until(lambda: h.spool.parked_count >= 10 and not h.engine._balancing)
            assert h.spool.next_parked.due == float("inf")  # never due by itself
            h.engine._arm_timer()
            assert h.engine._timer_at < float("inf")  # a file never due arms no timer
            await h.send("a@sender.test", ["free@example.test"])
            sink = h.sinks["127.0.0.2"]
            await h.until(lambda: sink.count == 1)
            await asyncio.sleep(0.1)
            assert sink.count == 1
            assert len(await h.engine.change_parked("release")) == h.spool.parked_count
            for sm in h.engine.messages():
                await h.engine.release_message(sm.envelope.id)
            await h.until(lambda: sink.count == 21)
            await h.until(lambda: h.engine.stats.queued == 0)

    asyncio.run(main())


def test_flush_of_a_message_being_parked_reaches_its_parked_file(tmp_path):
    """`fastmta queue flush ID` while ID is being written to a parked file: the engine waits
    for the park to end, says the message is not resident, and the parked file is changed."""
    from fastmta.protocol.replies import reply

    accept = []

    def rcpt_reply(address):
        return None if accept else reply(451, "4.2.1", "try later")

    async def main():
        h = Harness(tmp_path, {"127.0.0.2": Behaviour(rcpt_reply=rcpt_reply)}, retry=3600)
        async with h:
            h.mx("example.test", (10, "mx1.example.test", "127.0.0.2"))
            sm = await h.send("a@sender.test", ["x@example.test"])
            qid = sm.envelope.id
            await h.until(lambda: h.engine.stats.deferred == 1 and resident(h) == 1)
            victims = h.engine.scheduler.evict(1)  # as _balance does
            parking = asyncio.ensure_future(h.engine._park(victims))
            await asyncio.sleep(0)
            assert qid in h.engine._parking  # the park is under way
            assert await h.engine.flush_message(qid) is False  # parked by now
            assert parking.done() and h.spool.parked_count == 1 and resident(h) == 0
            accept.append(True)
            assert await h.engine.change_parked("flush", {qid}) == [qid]
            sink = h.sinks["127.0.0.2"]
            await h.until(lambda: sink.count == 1 and h.engine.stats.queued == 0)

    asyncio.run(main())
