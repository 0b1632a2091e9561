"""Damage inside a parked file or an injected file (a bad sector, a flipped bit) costs only the
damaged record: every sound message is still loaded, each damaged span is logged and the file
is kept as ``.bad`` for the operator (the same rule as segment recovery, test_spool_corruption.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

from fastmta.spool import Envelope, Recipient, Spool, inject
from fastmta.spool.parked import (
    PARKED,
    envelopes,
    list_parked,
    read_parked,
    rewrite_parked,
    write_parked,
)
from fastmta.spool.records import ENCODER
from fastmta.spool.segment import (
    HEADER_SIZE,
    RecordType,
    frame,
    list_segments,
    message_payload,
    scan,
    segment_name,
)


def env(qid: str, due: float = 0.0) -> Envelope:
    return Envelope(qid, "a@x.test", [Recipient(f"{qid}@y.test")], 1.0, next_attempt=due)


def body(i: int) -> bytes:
    return b"Subject: %d\r\n\r\n" % i + b"x" * 200 + b"\r\n"


IDS = [f"q{i}" for i in range(5)]


def _flip(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ 1]))


def _park_five(d: str, *, header: bool) -> str:
    """A parked file of q0..q4 with record q2 damaged (in its header, or in its message
    bytes); returns its path."""
    pf = write_parked(d, [(env(q), body(i)) for i, q in enumerate(IDS)], fsync=False)
    path = os.path.join(d, PARKED, pf.name)
    with open(path, "rb") as f:
        records, _ = scan(f.read())
    pos, _, payload = records[2]
    _flip(path, pos if header else pos + HEADER_SIZE + len(payload) - 10)
    return path


def test_read_parked_loads_every_message_around_damaged_bytes(tmp_path, caplog):
    d = str(tmp_path)
    path = _park_five(d, header=False)
    with caplog.at_level(logging.ERROR, "fastmta.spool"):
        got = read_parked(d, os.path.basename(path))
    assert [e.id for e, _ in got] == ["q0", "q1", "q3", "q4"]  # used to stop at q2
    assert [data for _, data in got] == [body(i) for i in (0, 1, 3, 4)]
    assert not os.path.exists(path) and os.path.exists(path + ".bad")  # kept, not deleted
    assert "damaged bytes at offset" in caplog.text and "queue id q2" in caplog.text


def test_read_parked_steps_over_a_damaged_header(tmp_path, caplog):
    d = str(tmp_path)
    path = _park_five(d, header=True)
    with caplog.at_level(logging.ERROR, "fastmta.spool"):
        got = read_parked(d, os.path.basename(path))
    assert [e.id for e, _ in got] == ["q0", "q1", "q3", "q4"]
    assert os.path.exists(path + ".bad")
    assert "damaged bytes at offset" in caplog.text


def test_envelopes_lists_the_messages_after_a_damaged_header(tmp_path):
    d = str(tmp_path)
    path = _park_five(d, header=True)
    with open(path, "rb") as f:
        raw = f.read()
    got = [(e.id, raw[o : o + n]) for e, o, n in envelopes(d, os.path.basename(path))]
    assert got == [(q, body(i)) for i, q in enumerate(IDS) if i != 2]  # as loading would


def test_rewrite_of_a_damaged_file_keeps_its_sound_messages_parked(tmp_path):
    d = str(tmp_path)
    path = _park_five(d, header=False)
    new, ids = rewrite_parked(d, os.path.basename(path), lambda e: False, fsync=False)
    assert ids == []
    assert list_parked(d) == [new] and new.count == 4  # not left behind in the .bad file
    assert [e.id for e, _ in read_parked(d, new.name)] == ["q0", "q1", "q3", "q4"]
    assert os.path.exists(path + ".bad")


def test_unpark_of_a_damaged_file_stores_every_sound_message(tmp_path):
    async def main():
        sp = Spool(str(tmp_path), fsync=False)
        await sp.open()
        sms = [await sp.store(env(q, time.time() + 60), body(i)) for i, q in enumerate(IDS)]
        pf = await sp.park(sms)
        await sp.close()
        path = os.path.join(tmp_path, PARKED, pf.name)
        with open(path, "rb") as f:
            records, _ = scan(f.read())
        pos, _, payload = records[2]
        _flip(path, pos + HEADER_SIZE + len(payload) - 10)
        sp = Spool(str(tmp_path), fsync=False)
        await sp.open()
        stored = await sp.unpark(sp.next_parked)
        assert [sm.envelope.id for sm in stored] == ["q0", "q1", "q3", "q4"]
        assert [sp.read(sm) for sm in stored] == [body(i) for i in (0, 1, 3, 4)]
        assert sp.next_parked is None and sp.parked_count == 0
        await sp.close()
        assert os.listdir(os.path.join(tmp_path, PARKED)) == [pf.name + ".loading.bad"]

    asyncio.run(main())


# ----------------------------------------------------------------------------------- incoming


def _adopt(root: Path) -> list[tuple[str, bytes]]:
    async def main():
        sp = Spool(root, fsync=False)
        live = await sp.open()
        out = [(sm.envelope.id, sp.read(sm)) for sm in live]
        await sp.close()
        return out

    return asyncio.run(main())


def test_a_damaged_injected_file_loses_only_its_message_and_names_it(tmp_path, caplog):
    ids = [inject(tmp_path, env(q), body(i), fsync=False) for i, q in enumerate(IDS)]
    bad = tmp_path / "incoming" / (ids[2] + ".msg")
    _flip(str(bad), bad.stat().st_size - 10)
    with caplog.at_level(logging.ERROR, "fastmta.spool"):
        got = _adopt(tmp_path)
    assert got == [(q, body(i)) for i, q in enumerate(IDS) if i != 2]
    assert os.listdir(tmp_path / "adopting") == [ids[2] + ".msg.bad"]
    assert "queue id q2 (unverified)" in caplog.text  # the log says which message is lost


def test_damage_beside_a_sound_injected_record_still_adopts_it(tmp_path, caplog):
    """A sound MESSAGE record with damaged bytes before or after it: the message is adopted,
    the damage logged, and the file kept as .bad."""
    inc = tmp_path / "incoming"
    inc.mkdir()
    for qid, junk_before, junk_after in (("qa", b"\0" * 7, b""), ("qb", b"", b"junk!")):
        rec = b"".join(
            bytes(p)
            for p in frame(
                RecordType.MESSAGE, message_payload(ENCODER.encode(env(qid)), [b"m\r\n"])
            )
        )
        (inc / (qid + ".msg")).write_bytes(junk_before + rec + junk_after)
    with caplog.at_level(logging.ERROR, "fastmta.spool"):
        got = _adopt(tmp_path)
    assert got == [("qa", b"m\r\n"), ("qb", b"m\r\n")]  # both used to be rejected whole
    assert sorted(os.listdir(tmp_path / "adopting")) == ["qa.msg.bad", "qb.msg.bad"]
    assert "7 damaged bytes at offset 0" in caplog.text
    assert "5 damaged bytes at offset" in caplog.text


def test_damaged_bytes_inside_a_segment_are_counted_in_the_stats(tmp_path):
    async def main():
        sp = Spool(tmp_path, fsync=False)
        await sp.open()
        for i, q in enumerate(IDS):
            await sp.store(env(q), body(i))
        await sp.close()
        (seg,) = list_segments(tmp_path)
        path = os.path.join(tmp_path, segment_name(seg))
        with open(path, "rb") as f:
            records, _ = scan(f.read())
        pos, _, payload = records[2]
        _flip(path, pos + HEADER_SIZE + len(payload) - 10)
        sp = Spool(tmp_path, fsync=False)
        live = await sp.open()
        assert [sm.envelope.id for sm in live] == ["q0", "q1", "q3", "q4"]
        assert sp.stats.damaged_bytes == HEADER_SIZE + len(payload)
        assert sp.stats.truncated_bytes == 0
        await sp.close()

    asyncio.run(main())
