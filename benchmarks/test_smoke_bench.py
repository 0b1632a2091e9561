"""The ingest, end-to-end and drain benchmarks in smoke mode (tiny counts): proof, in CI, that they
still run end to end against fastmta (and Postfix when installed). Nothing is measured.

    python -m pytest benchmarks/test_smoke_bench.py -q
"""

from __future__ import annotations

import os
import shutil
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_drain  # noqa: E402
import bench_e2e  # noqa: E402
import bench_ingest  # noqa: E402
import harness  # noqa: E402
from postfix import postfix_available  # noqa: E402

pytestmark = pytest.mark.skipif(
    shutil.which("smtp-source") is None and not os.path.exists("/usr/sbin/smtp-source"),
    reason="Postfix's smtp-source / smtp-sink are not installed",
)

WITH_POSTFIX = postfix_available() and os.geteuid() == 0


def _check(rows) -> None:
    bad = [f"{r.case.name} {r.who}: {r.note}" for r in rows if not r.ok]
    assert not bad, bad
    whos = {r.who for r in rows}
    assert "fastmta w=2" in whos
    if WITH_POSTFIX:
        assert "postfix" in whos


def test_ingest_smoke() -> None:
    rows = bench_ingest.run(smoke=True, workers=(2,), with_postfix=WITH_POSTFIX)
    _check(rows)
    assert all(r.arrived == r.case.count for r in rows)  # every message really in the queue
    assert "| 200 x 1 KiB | fastmta w=2 |" in bench_ingest.table(rows)


def test_e2e_smoke() -> None:
    rows = bench_e2e.run(smoke=True, workers=(2,), with_postfix=WITH_POSTFIX)
    _check(rows)
    for r in rows:
        if "ceiling" not in r.who:  # every sink got its share: one per domain
            assert r.arrived == r.case.count * max(1, r.case.domains)
    assert {r.case.name for r in rows if r.who == bench_e2e.RELAY_CEILING} == {
        "1k",
        "50k",
        "10rcpt",
    }
    assert "10 rcpts / 10 domains" in bench_e2e.table(rows)


def test_drain_smoke() -> None:
    rows = bench_drain.run(smoke=True, workers=(2,), with_postfix=WITH_POSTFIX)
    _check(rows)
    assert all(r.arrived == r.case.count for r in rows)  # the whole held queue reached the sink
    assert "fastmta w=2 no chaining" in {r.who for r in rows}
    assert "chaining on" in bench_drain.chaining_verdict(rows)


def test_write_section_keeps_other_sections(tmp_path) -> None:
    path = str(tmp_path / "RESULTS.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("# results\n\n## parser\nkeep me\n")
    harness.write_section("e2e", "first", path)
    harness.write_section("ingest", "second", path)
    harness.write_section("e2e", "third", path)
    text = open(path, encoding="utf-8").read()
    assert "keep me" in text and "second" in text and "third" in text
    assert "first" not in text and text.count("<!-- begin e2e -->") == 1
