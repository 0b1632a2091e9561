"""Drain benchmark: a held queue let go into smtp-sink, fastmta against Postfix.

What a bulk sender sees after a pause (a campaign queued with delivery held, a relay coming
back from an outage): N messages wait in the queue, delivery is let go, and the MTA empties
its queue into one Postfix smtp-sink on loopback, as fast as it can.

- fastmta: smtp-source fills it with ``server.hold_delivery = true``; it is stopped and
  started again with delivery on (what SIGHUP does to each worker); wall from that start
  (spool recovery included) until the sink has every message. Also run with
  ``delivery.chain_transactions = false``, so the table shows what chaining buys in one run.
- Postfix: smtp-source fills it with every message on hold (``check_recipient_access
  static:HOLD``) and ``relayhost`` = the sink; ``postsuper -H ALL`` and ``postqueue -f`` let
  them go; wall from postsuper until the sink has every message.
- Both durable: fastmta's delivered-records are fsync'd before a message leaves the spool;
  Postfix removes each queue file after delivery.
- CPU: the MTA's process tree during the drain.

Run ``python benchmarks/bench_drain.py [--smoke] [--repeat N]``; the table goes to stdout and
into benchmarks/RESULTS.md (section "drain").
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness as h  # noqa: E402
from postfix import PostfixInstance  # noqa: E402

RUN_TIMEOUT = 600.0  # seconds a fill or a drain may take


@dataclass(frozen=True)
class Case:
    name: str
    title: str
    count: int
    size: int


FULL = [Case("1k", "20,000 x 1 KiB", 20_000, 1024)]
SMOKE = [Case("1k", "200 x 1 KiB", 200, 1024)]

Row = h.Row
NO_CHAIN = "no chaining"


def _fill(procs: h.Procs, case: Case, port: int) -> None:
    res = h.run_load(procs, h.smtp_source(port, case.count, case.size), RUN_TIMEOUT)
    if res.code != 0:
        raise RuntimeError(f"smtp-source exit {res.code} while filling the queue")


def _drained(case: Case, who: str, sink: h.SmtpSink, meter: h.TreeMeter, t0: float) -> Row:
    end = sink.wait(RUN_TIMEOUT)
    meter.stop()
    if end is None:
        return Row(case, who, False, arrived=sink.count, note=f"timeout: sink has {sink.count}")
    return Row(
        case, who, True, end - t0, sink.count, meter.cpu, 0.0, meter.peak_rss, meter.peak_pss
    )


def run_fastmta(case: Case, workers: int, chain: bool = True) -> Row:
    with h.scratch(f"fastmta-drain-{case.name}-") as (procs, base):
        who = f"fastmta w={workers}" + ("" if chain else f" {NO_CHAIN}")
        try:
            sink_port = h.free_port()
            sink = h.start_smtp_sink(procs, "127.0.0.1", sink_port, case.count)
            h.wait_listening(sink_port, 1, proc=sink.proc)
            port = h.free_port()
            kw = dict(
                workers=workers, relayhost=f"[127.0.0.1]:{sink_port}", delivery_port=sink_port,
                chain_transactions=chain,
            )  # fmt: skip
            cfg = h.fastmta_config(base, port, hold=True, **kw)
            h.say(f"  {who}: filling the queue with {case.title}")
            mta = h.start_fastmta(procs, base, cfg, port, workers)
            _fill(procs, case, port)
            h.stop_fastmta(procs, mta)
            cfg = h.fastmta_config(base, port, hold=False, **kw)
            h.say(f"  {who}: draining")
            t0 = time.perf_counter()
            mta = h.launch_fastmta(procs, base, cfg)
            meter = h.TreeMeter(mta.pid)
            meter.start()
            return _drained(case, who, sink, meter, t0)
        except Exception as e:  # noqa: BLE001 - one failed run must not lose the others
            return Row(case, who, False, note=f"error: {e}")


def run_postfix(case: Case) -> Row:
    with h.scratch(f"postfix-drain-{case.name}-") as (procs, base):
        try:
            sink_port = h.free_port()
            sink = h.start_smtp_sink(procs, "127.0.0.1", sink_port, case.count)
            h.wait_listening(sink_port, 1, proc=sink.proc)
            port = h.free_port()
            pf = PostfixInstance(base, port, mode="hold", relayhost=f"[127.0.0.1]:{sink_port}")
            procs.at_stop(pf.stop)
            pf.start()
            h.wait_listening(port, 1, timeout=30)
            h.say(f"  postfix: filling the queue with {case.title}")
            _fill(procs, case, port)
            deadline = time.monotonic() + 60
            while pf.count_queue("hold") < case.count and time.monotonic() < deadline:
                time.sleep(0.1)
            held = pf.count_queue("hold")
            if held < case.count:
                return Row(case, "postfix", False, note=f"only {held}/{case.count} held")
            h.say("  postfix: draining")
            meter = h.TreeMeter(pf.master_pid())
            meter.start()
            t0 = time.perf_counter()
            for cmd in (["postsuper", "-H", "ALL"], ["postqueue", "-f"]):
                subprocess.run(
                    [cmd[0], "-c", pf.config_dir, *cmd[1:]],
                    check=True,
                    capture_output=True,
                    timeout=120,
                )
            row = _drained(case, "postfix", sink, meter, t0)
            if not row.ok:
                row.note += " | " + pf.log_tail(3).replace("\n", " ")[:300]
            return row
        except Exception as e:  # noqa: BLE001
            return Row(case, "postfix", False, note=f"error: {e}")


def run(
    smoke: bool, workers: Sequence[int] = (2, 1), with_postfix: bool = True, repeat: int = 1
) -> list[Row]:
    """Every case: fastmta per worker count, fastmta w=first without chaining, Postfix;
    ``repeat`` interleaved rounds, the best of each kept."""
    rows: list[Row] = []
    pause = 0.5 if smoke else 5.0
    for case in SMOKE if smoke else FULL:
        for rnd in range(1, repeat + 1):
            h.say(f"drain {case.name}: {case.title}" + (f" (round {rnd}/{repeat})" * (repeat > 1)))
            no_chain = functools.partial(run_fastmta, workers=workers[0], chain=False)
            h.run_mtas(rows, case, workers, with_postfix, run_fastmta, run_postfix, _line, pause,
                       variants=[no_chain])  # fmt: skip
    return h.best_of(rows)


def _line(r: Row) -> str:
    if not r.ok:
        return f"{r.who}: FAILED {r.note}"
    return (
        f"{r.who}: {r.arrived} at the sink in {r.wall:.2f} s = {r.rate:,.0f} msg/s, "
        f"MTA CPU {r.mta_cpu:.2f} s ({r.cpu_per_1000:.3f} s/1000)"
    )


def table(rows: Sequence[Row]) -> str:
    header = [
        "case", "MTA", "msg/s", "wall s", "at the sink", "MTA CPU s / 1000",
        "peak RSS MiB (PSS)", "vs Postfix msg/s", "vs Postfix CPU/msg", "note",
    ]  # fmt: skip
    out = []
    for name in dict.fromkeys(r.case.name for r in rows):
        group = [r for r in rows if r.case.name == name]
        pf = next((r for r in group if r.who == "postfix" and r.ok), None)
        for r in group:
            out.append([
                r.case.title, r.who, f"{r.rate:,.0f}" if r.ok else "FAILED",
                f"{r.wall:.2f}" if r.ok else "", r.arrived,
                f"{r.cpu_per_1000:.3f}" if r.ok else "",
                f"{r.peak_rss / 2**20:.0f} ({r.peak_pss / 2**20:.0f})" if r.ok else "",
                f"{r.rate / pf.rate:.1f}x" if pf and r.ok else "",
                f"{pf.cpu_per_1000 / r.cpu_per_1000:.1f}x less"
                if pf and r.ok and r.cpu_per_1000 else "",
                r.note.replace("|", "/")[:160],
            ])  # fmt: skip
    return h.md_table(header, out)


def chaining_verdict(rows: Sequence[Row]) -> str:
    out = []
    for name in dict.fromkeys(r.case.name for r in rows):
        group = {r.who: r for r in rows if r.case.name == name and r.ok}
        off = next((r for w, r in group.items() if w.endswith(NO_CHAIN)), None)
        on = group.get(off.who.removesuffix(f" {NO_CHAIN}")) if off else None
        if on and off:
            out.append(
                f"- {on.case.title}, {on.who}: chaining on {on.rate:,.0f} msg/s, "
                f"{on.cpu_per_1000:.3f} CPU s/1000; off {off.rate:,.0f} msg/s, "
                f"{off.cpu_per_1000:.3f} CPU s/1000 ({on.rate / off.rate:.2f}x the rate, "
                f"{off.cpu_per_1000 / on.cpu_per_1000:.2f}x less CPU per message)"
            )
    return "\n".join(out) or "- not measured"


def report(rows: Sequence[Row], smoke: bool) -> str:
    return (
        f"## Drain: a held queue let go into smtp-sink{' (SMOKE counts)' if smoke else ''}\n\n"
        f"{h.machine_md()}\n"
        "- fill: smtp-source -s 20 with delivery held (fastmta server.hold_delivery, Postfix "
        "check_recipient_access static:HOLD); not timed\n"
        "- drain: fastmta started again with delivery on (spool recovery included); Postfix "
        "postsuper -H ALL + postqueue -f; wall until one smtp-sink has every message\n"
        "- CPU: MTA process tree during the drain; fastmta delivery.tls = none, Postfix "
        "smtp_tls_security_level = none\n\n"
        f"{table(rows)}\n\nChained transactions (delivery.chain_transactions):\n\n"
        f"{chaining_verdict(rows)}\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    return h.bench_main("drain", __doc__, run, report, argv)


if __name__ == "__main__":
    sys.exit(main())
