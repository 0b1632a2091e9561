"""Ingest benchmark: smtp-source into an MTA that holds every message, fastmta against Postfix.

fastmta runs with ``server.hold_delivery = true``; Postfix puts each message on hold
(``check_recipient_access static:HOLD``). Both fsync a message before answering 250 (Postfix's
cleanup(8) does by default). The load is ``smtp-source -s 20 -m N -l SIZE`` (one message per
connection), the same flags for both. Wall time runs from the start of smtp-source to its exit;
the messages that arrived are then counted (fastmta: its spool shards, read with the spool's own
recovery scan after the server stopped; Postfix: the files in its hold queue).

The tools' ceiling is smtp-source -> smtp-sink in the same run; when fastmta gets close to it,
the output says so and fastmta's CPU per message is the number to look at.

One more fastmta row, "fastmta dkim w=1", signs every message (``[[dkim]]`` for smtp-source's
From: domain, an RSA-2048 key made for the run; loopback is in mynetworks, so the client is
trusted): what DKIM signing costs per message. Postfix signs nothing (no milter), so that row
is not compared with it.

Run ``python benchmarks/bench_ingest.py [--smoke]``; the table goes to stdout and into
benchmarks/RESULTS.md (section "ingest").
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness as h  # noqa: E402
from postfix import PostfixInstance  # noqa: E402

RUN_TIMEOUT = 600.0  # seconds one MTA run may take
CEILING_NEAR = 0.9  # fastmta at >= 90% of the tool's ceiling: the tool is the limit


@dataclass(frozen=True)
class Case:
    name: str
    title: str
    count: int
    size: int


FULL = [Case("1k", "20,000 x 1 KiB", 20_000, 1024), Case("50k", "5,000 x 50 KiB", 5_000, 51_200)]
SMOKE = [Case("1k", "200 x 1 KiB", 200, 1024), Case("50k", "100 x 50 KiB", 100, 51_200)]


Row = h.Row


def _load(case: Case, port: int) -> list[str]:
    return h.smtp_source(port, case.count, case.size)


def ceiling(case: Case) -> Row:
    procs = h.Procs()
    try:
        port = h.free_port()
        sink = h.start_smtp_sink(procs, "127.0.0.1", port, case.count)
        h.wait_listening(port, 1, proc=sink.proc)
        res = h.run_load(procs, _load(case, port), RUN_TIMEOUT)
        h.wait_sinks([sink], 10)
        ok = res.code == 0 and sink.count >= case.count
        return Row(case, "ceiling smtp-source -> smtp-sink", ok, res.wall, sink.count, 0, res.cpu)
    except Exception as e:  # noqa: BLE001 - one failed run must not lose the others
        return Row(case, "ceiling smtp-source -> smtp-sink", False, note=f"error: {e}")
    finally:
        procs.stop_all()


def _measure(procs: h.Procs, case: Case, root: int, port: int) -> tuple[h.LoadResult, h.TreeMeter]:
    meter = h.TreeMeter(root)
    meter.start()
    try:
        res = h.run_load(procs, _load(case, port), RUN_TIMEOUT)
    finally:
        meter.stop()
    return res, meter


DKIM = "fastmta dkim w=1"


def run_fastmta(case: Case, workers: int, dkim: bool = False) -> Row:
    with h.scratch(f"fastmta-ingest-{case.name}-") as (procs, base):
        who = DKIM if dkim else f"fastmta w={workers}"
        try:
            port = h.free_port()
            extra = _dkim_table(base) if dkim else ""
            cfg = h.fastmta_config(base, port, workers=workers, hold=True, extra=extra)
            mta = h.start_fastmta(procs, base, cfg, port, workers)
            h.say(f"  {who}: running {case.title}")
            res, meter = _measure(procs, case, mta.pid, port)
            h.stop_fastmta(procs, mta)
            arrived = h.count_fastmta_spool(os.path.join(base, "spool"))
            row = Row(
                case, who, res.code == 0 and arrived == case.count, res.wall, arrived, meter.cpu,
                res.cpu, meter.peak_rss, meter.peak_pss,
            )  # fmt: skip
            if not row.ok:
                row.note = f"smtp-source exit {res.code}, {arrived}/{case.count} in the spool"
            return row
        except Exception as e:  # noqa: BLE001
            return Row(case, who, False, note=f"error: {e}")


def _can_sign() -> bool:
    """The DKIM row needs the `cryptography` package (fastmta[dkim]); without it, no row."""
    try:
        import cryptography  # noqa: F401, PLC0415
    except ImportError:
        h.say("  (no DKIM row: pip install 'fastmta[dkim]' for it)")
        return False
    return True


def _dkim_table(base: str) -> str:
    """A [[dkim]] table signing smtp-source's mail (From: <from@x.test>) with a new key."""
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: PLC0415

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = os.path.join(base, "dkim.pem")
    with open(path, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return f'[[dkim]]\ndomain = "x.test"\nselector = "bench"\nkey_file = "{path}"\n'


def run_postfix(case: Case) -> Row:
    with h.scratch(f"postfix-ingest-{case.name}-") as (procs, base):
        try:
            port = h.free_port()
            pf = PostfixInstance(base, port, mode="hold")
            procs.at_stop(pf.stop)
            pf.start()
            h.wait_listening(port, 1, timeout=30)
            h.say(f"  postfix: running {case.title}")
            res, meter = _measure(procs, case, pf.master_pid(), port)
            arrived = pf.count_queue("hold")
            row = Row(
                case, "postfix", res.code == 0 and arrived == case.count, res.wall, arrived,
                meter.cpu, res.cpu, meter.peak_rss, meter.peak_pss,
            )  # fmt: skip
            if not row.ok:
                row.note = f"smtp-source exit {res.code}, {arrived}/{case.count} held | "
                row.note += pf.log_tail(2).replace("\n", " ")[:200]
            return row
        except Exception as e:  # noqa: BLE001
            return Row(case, "postfix", False, note=f"error: {e}")


def run(
    smoke: bool, workers: Sequence[int] = (2, 1), with_postfix: bool = True, repeat: int = 1
) -> list[Row]:
    """Every case: the ceiling, fastmta per worker count, Postfix; ``repeat`` interleaved
    rounds, the best of each kept."""
    rows: list[Row] = []
    pause = 0.5 if smoke else 5.0
    for case in SMOKE if smoke else FULL:
        for rnd in range(1, repeat + 1):
            h.say(f"ingest {case.name}: {case.title}" + (f" (round {rnd}/{repeat})" * (repeat > 1)))
            rows.append(ceiling(case))
            h.say(f"  -> {_line(rows[-1])}")
            h.run_mtas(
                rows, case, workers, with_postfix, run_fastmta, run_postfix, _line, pause,
                variants=[lambda c: run_fastmta(c, 1, dkim=True)] if _can_sign() else [],
            )  # fmt: skip
    rows = h.best_of(rows)
    for case in SMOKE if smoke else FULL:
        group = [r for r in rows if r.case.name == case.name]
        ceil = next((r.rate for r in group if r.who.startswith("ceiling") and r.ok), 0.0)
        for r in group:
            if ceil and r.ok and r.who.startswith("fastmta") and r.rate >= CEILING_NEAR * ceil:
                r.note = (r.note + " load tool ceiling reached: compare CPU per message").strip()
                h.say(f"  !! {r.who} is at {100 * r.rate / ceil:.0f}% of smtp-source's ceiling")
    return rows


def _line(r: Row) -> str:
    if not r.ok:
        return f"{r.who}: FAILED {r.note}"
    return (
        f"{r.who}: {r.arrived} arrived in {r.wall:.2f} s = {r.rate:,.0f} msg/s, "
        f"MTA CPU {r.mta_cpu:.2f} s ({r.cpu_per_1000:.2f} s/1000), load tool CPU {r.load_cpu:.2f} s"
    )


def table(rows: Sequence[Row]) -> str:
    header = [
        "case", "MTA / tool", "msg/s", "wall s", "arrived", "MTA CPU s", "MTA CPU s / 1000",
        "peak RSS MiB (PSS)", "smtp-source CPU s", "vs Postfix msg/s", "vs Postfix CPU/msg",
        "% of ceiling", "note",
    ]  # fmt: skip
    out = []
    for name in dict.fromkeys(r.case.name for r in rows):
        group = [r for r in rows if r.case.name == name]
        pf = next((r for r in group if r.who == "postfix" and r.ok), None)
        ceil = next((r.rate for r in group if r.who.startswith("ceiling") and r.ok), 0.0)
        for r in group:
            mta = not r.who.startswith("ceiling") and r.ok
            vs = pf if r.who != DKIM else None  # Postfix signs nothing: no comparison
            out.append([
                r.case.title, r.who, f"{r.rate:,.0f}" if r.ok else "FAILED",
                f"{r.wall:.2f}" if r.ok else "", r.arrived,
                f"{r.mta_cpu:.2f}" if mta else "", f"{r.cpu_per_1000:.2f}" if mta else "",
                f"{r.peak_rss / 2**20:.0f} ({r.peak_pss / 2**20:.0f})" if mta else "",
                f"{r.load_cpu:.2f}",
                f"{r.rate / vs.rate:.1f}x" if vs and mta else "",
                f"{vs.cpu_per_1000 / r.cpu_per_1000:.1f}x less"
                if vs and mta and r.cpu_per_1000 else "",
                f"{100 * r.rate / ceil:.0f}%" if ceil and mta else "",
                r.note.replace("|", "/")[:160],
            ])  # fmt: skip
    return h.md_table(header, out)


def goals(rows: Sequence[Row]) -> str:
    """The issue's goal per case: >= 10x Postfix's msg/s; where that is above smtp-source's
    own ceiling, the comparison falls to CPU per message."""
    out = []
    for name in dict.fromkeys(r.case.name for r in rows):
        group = [r for r in rows if r.case.name == name]
        pf = next((r for r in group if r.who == "postfix" and r.ok), None)
        ceil = next((r.rate for r in group if r.who.startswith("ceiling") and r.ok), 0.0)
        runs = [r for r in group if r.who.startswith("fastmta w=") and r.ok]
        if not pf or not runs:
            continue
        best = max(runs, key=lambda r: r.rate)
        target = 10 * pf.rate
        line = (
            f"- {group[0].case.title}: goal 10x Postfix = {target:,.0f} msg/s: "
            f"{'met' if best.rate >= target else 'NOT met'} ({best.who} {best.rate:,.0f} msg/s "
            f"= {best.rate / pf.rate:.1f}x Postfix)"
        )
        if ceil and target > ceil:
            line += (
                f"; the goal is above smtp-source's own ceiling ({ceil:,.0f} msg/s), so CPU per "
                f"message decides: fastmta {best.cpu_per_1000:.2f} vs Postfix "
                f"{pf.cpu_per_1000:.2f} CPU s/1000 ({pf.cpu_per_1000 / best.cpu_per_1000:.1f}x "
                f"less), at {best.rate / ceil:.0%} of the ceiling"
            )
        out.append(line)
    return "\n".join(out)


def report(rows: Sequence[Row], smoke: bool) -> str:
    return (
        f"## Ingest: smtp-source -> MTA, delivery held{' (SMOKE counts)' if smoke else ''}\n\n"
        f"{h.machine_md()}\n"
        "- load: smtp-source -s 20 -m N -l SIZE (one message per connection), same flags for all\n"
        "- fastmta: server.hold_delivery = true; Postfix: check_recipient_access static:HOLD; "
        "both fsync before 250\n"
        "- wall: smtp-source start to exit; arrived: fastmta spool shards (recovery scan after "
        "stop), Postfix hold/ queue files\n"
        "- CPU: MTA process tree (utime+stime, reaped children included) during the load\n\n"
        f"{table(rows)}\n\nGoals:\n\n{goals(rows)}\n\n"
        f"Worker count (fastmta):\n\n{h.workers_verdict(rows)}\n\n"
        f"DKIM signing (rsa-sha256, 2048 bits, relaxed/relaxed):\n\n{dkim_cost(rows)}\n"
    )


def dkim_cost(rows: Sequence[Row]) -> str:
    """Per case: fastmta w=1 with and without signing, in the same run."""
    out = []
    for name in dict.fromkeys(r.case.name for r in rows):
        group = {r.who: r for r in rows if r.case.name == name and r.ok}
        plain, signed = group.get("fastmta w=1"), group.get(DKIM)
        if plain is None or signed is None:
            continue
        extra = (signed.cpu_per_1000 - plain.cpu_per_1000) * 1000
        out.append(
            f"- {plain.case.title}: {signed.rate:,.0f} msg/s signed vs {plain.rate:,.0f} "
            f"unsigned, {signed.cpu_per_1000:.2f} vs {plain.cpu_per_1000:.2f} CPU s/1000 "
            f"({extra:+.0f} us of CPU per message for the signature)"
        )
    return "\n".join(out) or "- not run"


def main(argv: Sequence[str] | None = None) -> int:
    return h.bench_main("ingest", __doc__, run, report, argv)


if __name__ == "__main__":
    sys.exit(main())
