"""End-to-end benchmark: load tool -> MTA on loopback -> sink, fastmta against Postfix.

Wall time runs from the start of the load tool until the sink(s) counted every message.
Durability is on for both MTAs (each fsyncs a message before its 250). Cases:

``1k``      20,000 x 1 KiB, smtp-source (20 sessions, one message per connection)
``50k``     5,000 x 50 KiB, smtp-source
``10rcpt``  2,000 x 1 KiB, 10 recipients in 10 domains d1.test..d10.test, each domain its own
            smtp-sink on 127.0.0.11..20 (one port). fastmta finds them by MX lookups through
            the package's test DNS server; Postfix through transport_maps (it cannot use a DNS
            server on a custom port). smtp-source puts all its recipients in one domain, so the
            load comes from harness.py's own generator, the same for both MTAs; its speed is
            measured against smtp-sink next to smtp-source's.

The sink is Postfix's smtp-sink everywhere (faster than the package's sink); per-domain counts
come from one smtp-sink per domain. Run ``python benchmarks/bench_e2e.py [--smoke]``; the table
goes to stdout and into benchmarks/RESULTS.md (section "e2e").
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness as h  # noqa: E402
from postfix import PostfixInstance, ensure_postfix  # noqa: E402

DOMAINS = [f"d{i}.test" for i in range(1, 11)]
SINK_IPS = [f"127.0.0.{10 + i}" for i in range(1, 11)]
RUN_TIMEOUT = 600.0  # seconds one MTA run may take (Postfix 20,000 x 1 KiB: about 70 s)


@dataclass(frozen=True)
class Case:
    name: str
    title: str
    count: int
    size: int
    domains: int  # 0 = one recipient to@y.test through one sink (smtp-source)


FULL = [
    Case("1k", "20,000 x 1 KiB", 20_000, 1024, 0),
    Case("50k", "5,000 x 50 KiB", 5_000, 50 * 1024, 0),
    Case("10rcpt", "2,000 x 1 KiB, 10 rcpts / 10 domains", 2_000, 1024, 10),
]
SMOKE = [
    Case("1k", "200 x 1 KiB", 200, 1024, 0),
    Case("50k", "100 x 50 KiB", 100, 50 * 1024, 0),
    Case("10rcpt", "50 x 1 KiB, 10 rcpts / 10 domains", 50, 1024, 10),
]


Row = h.Row


def _load_cmd(case: Case, port: int, tool: str) -> list[str]:
    if tool == "smtp-source":
        return h.smtp_source(port, case.count, case.size, rcpts=case.domains or 1)
    return h.loadgen_cmd(port, case.count, case.size, DOMAINS[: case.domains] or ["y.test"])


def _tool(case: Case) -> str:
    return "loadgen" if case.domains else "smtp-source"


# ----------------------------------------------------------------------------- one run


def ceiling(case: Case, tool: str) -> Row:
    """The load tool straight into one smtp-sink: the tools' own ceiling."""
    procs = h.Procs()
    try:
        port = h.free_port()
        sink = h.start_smtp_sink(procs, "127.0.0.1", port, case.count)
        h.wait_listening(port, 1, proc=sink.proc)
        t0 = time.perf_counter()
        load = procs.start(_load_cmd(case, port, tool))
        ex = h.wait_exits([load], RUN_TIMEOUT).get(load.pid)
        end = h.wait_sinks([sink], 10)
        if ex is None or end is None:
            return Row(case, f"ceiling {tool}", False, note=f"timeout, sink has {sink.count}")
        return Row(case, f"ceiling {tool}", ex.code == 0, end - t0, sink.count, 0, ex.cpu)
    finally:
        procs.stop_all()


RELAY_CEILING = "relay ceiling (2 pairs)"


def relay_ceiling(case: Case) -> Row:
    """Two tool pairs at once on this machine: the load tool -> smtp-sink (what a relay
    receives) and smtp-source -> another smtp-sink (what it sends on: one message per
    connection, or for the multi-domain case one single-recipient transaction per domain over
    reused connections, ``-d``, as fastmta's pool does). A relay does at least the work of one
    sink and one source, so no MTA between the tools can beat this rate on this machine;
    msg/s counts the load tool's messages, both pairs finished."""
    procs = h.Procs()
    try:
        ports = [h.free_port(), h.free_port()]
        onward = case.count * max(1, case.domains)
        sinks = [
            h.start_smtp_sink(procs, "127.0.0.1", ports[0], case.count),
            h.start_smtp_sink(procs, "127.0.0.1", ports[1], onward),
        ]
        for s, p in zip(sinks, ports, strict=True):
            h.wait_listening(p, 1, proc=s.proc)
        t0 = time.perf_counter()
        loads = [
            procs.start(_load_cmd(case, ports[0], _tool(case))),
            procs.start(h.smtp_source(ports[1], onward, case.size, reuse=bool(case.domains))),
        ]
        exits = h.wait_exits(loads, RUN_TIMEOUT)
        end = h.wait_sinks(sinks, 10)
        if len(exits) < 2 or end is None:
            got = [s.count for s in sinks]
            return Row(case, RELAY_CEILING, False, note=f"timeout, sinks have {got}")
        ok = all(e.code == 0 for e in exits.values())
        cpu = sum(e.cpu for e in exits.values())
        return Row(case, RELAY_CEILING, ok, end - t0, case.count, 0, cpu)
    finally:
        procs.stop_all()


def _sinks(procs: h.Procs, case: Case) -> tuple[list[h.SmtpSink], int]:
    port = h.free_port()
    ips = SINK_IPS[: case.domains] if case.domains else ["127.0.0.1"]
    sinks = [h.start_smtp_sink(procs, ip, port, case.count) for ip in ips]
    for s in sinks:
        h.wait_listening(port, len(sinks), proc=s.proc)
    return sinks, port


def _measure(procs, case, mta_pid, port, who, sinks) -> Row:
    meter = h.TreeMeter(mta_pid)
    meter.start()
    t0 = time.perf_counter()
    load = procs.start(_load_cmd(case, port, _tool(case)))
    ex = h.wait_exits([load], RUN_TIMEOUT).get(load.pid)
    left = max(10.0, RUN_TIMEOUT - (time.perf_counter() - t0))
    end = h.wait_sinks(sinks, left) if ex is not None else None
    meter.stop()
    got = sum(s.count for s in sinks)
    want = case.count * max(1, len(sinks))
    if ex is None or end is None:
        return Row(case, who, False, arrived=got, note=f"timeout: sinks have {got}/{want}")
    row = Row(
        case, who, ex.code == 0 and got >= want, end - t0, got, meter.cpu, ex.cpu,
        meter.peak_rss, meter.peak_pss,
    )  # fmt: skip
    if ex.code != 0:
        row.note = f"load tool exit {ex.code}"
    elif got > want:
        row.note = f"{got - want} duplicate(s) at the sinks"
    return row


def run_fastmta(case: Case, workers: int) -> Row:
    with h.scratch(f"fastmta-e2e-{case.name}-") as (procs, base):
        who = f"fastmta w={workers}"
        try:
            sinks, sink_port = _sinks(procs, case)
            nameservers: list[str] = []
            relayhost = f"[127.0.0.1]:{sink_port}"
            if case.domains:
                zone = []
                for d, ip in zip(DOMAINS[: case.domains], SINK_IPS, strict=False):
                    zone += [f"{d} 3600 MX 10 mx.{d}", f"mx.{d} 3600 A {ip}"]
                _, dns_port = h.start_dns(procs, base, zone)
                nameservers, relayhost = [f"127.0.0.1:{dns_port}"], ""
            port = h.free_port()
            cfg = h.fastmta_config(
                base, port, workers=workers, hold=False, relayhost=relayhost,
                delivery_port=sink_port, nameservers=nameservers,
            )  # fmt: skip
            mta = h.start_fastmta(procs, base, cfg, port, workers)
            h.say(f"  {who}: running {case.title}")
            return _measure(procs, case, mta.pid, port, who, sinks)
        except Exception as e:  # noqa: BLE001 - one failed run must not lose the others
            return Row(case, who, False, note=f"error: {e}")


def run_postfix(case: Case) -> Row:
    with h.scratch(f"postfix-e2e-{case.name}-") as (procs, base):
        try:
            sinks, sink_port = _sinks(procs, case)
            port = h.free_port()
            if case.domains:
                transport = {
                    d: f"smtp:[{ip}]:{sink_port}"
                    for d, ip in zip(DOMAINS[: case.domains], SINK_IPS, strict=False)
                }
                pf = PostfixInstance(base, port, mode="relay", transport=transport)
            else:
                pf = PostfixInstance(base, port, mode="relay", relayhost=f"[127.0.0.1]:{sink_port}")
            procs.at_stop(pf.stop)
            pf.start()
            h.wait_listening(port, 1, timeout=30)
            h.say(f"  postfix: running {case.title}")
            row = _measure(procs, case, pf.master_pid(), port, "postfix", sinks)
            if not row.ok:
                row.note += " | " + pf.log_tail(3).replace("\n", " ")[:300]
            return row
        except Exception as e:  # noqa: BLE001
            return Row(case, "postfix", False, note=f"error: {e}")


def profile_fastmta(case: Case, workers: int = 2, rate: int = 200, native: bool = False) -> str:
    """Run ``case`` against fastmta under py-spy (all workers, --subprocesses, non-blocking, or
    with ``native`` C frames too, which pauses the process per sample); return a markdown
    section: the run's numbers, time per category, the top 15 functions."""
    spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(spy):
        return "py-spy is not installed (pip install py-spy): no profile\n"
    with h.scratch(f"fastmta-profile-{case.name}-") as (procs, base):
        raw = os.path.join(base, "profile.txt")
        sinks, sink_port = _sinks(procs, case)
        port = h.free_port()
        cfg = h.fastmta_config(
            base, port, workers=workers, hold=False, relayhost=f"[127.0.0.1]:{sink_port}"
        )
        mta = h.start_fastmta(procs, base, cfg, port, workers)
        cmd = [spy, "record", "--pid", str(mta.pid), "--subprocesses"]
        cmd.append("--native" if native else "--nonblocking")
        cmd += ["--rate", str(rate), "--format", "raw", "--output", raw]
        spyp = procs.start(cmd, log=os.path.join(base, "py-spy.out"))
        time.sleep(2.0)  # py-spy finds the worker processes
        h.say(f"  fastmta w={workers} under py-spy: running {case.title}")
        before = h.thread_cpu(mta.pid)
        row = _measure(procs, case, mta.pid, port, f"fastmta w={workers} (py-spy)", sinks)
        after = h.thread_cpu(mta.pid)
        threads = {k: after[k] - before.get(k, 0.0) for k in after}
        h.say(f"  -> {_line(row)}")
        spyp.send_signal(2)  # SIGINT: py-spy writes its output and exits
        h.wait_exits([spyp], 60)
        top, cats, top_py = h.profile_summary(raw)
        if not top:
            with open(os.path.join(base, "py-spy.out"), encoding="utf-8", errors="replace") as f:
                return f"py-spy recorded nothing: {f.read()[-500:]}\n"
        lines = [
            f"### fastmta, e2e {case.title}, {workers} workers, py-spy {rate} Hz"
            f"{' --native' if native else ''} (CPU samples only, all workers)\n",
            f"Under the profiler: {_line(row)}.\n",
            "CPU by thread (from /proc, exact; py-spy's samples below also count time a thread "
            "spends blocked in fdatasync or a futex as active):\n",
            h.md_table(
                ["thread", "CPU s", "CPU ms / 1000 msgs"],
                [[k, f"{v:.2f}", f"{v / case.count * 1e6:.0f}"] for k, v in threads.items()],
            ),
            "",
            "Where the samples fall (a stack counts for the first of: spool I/O thread, "
            "delivery, ingest, spool loop side; else other):\n",
            h.md_table(
                ["part", "share of samples"],
                [[k, f"{v:.1%}"] for k, v in sorted(cats.items(), key=lambda kv: -kv[1])],
            ),
            "\nTop 15 functions by self time:\n",
            h.md_table(
                ["#", "function (file)", "self share"],
                [[i + 1, f"`{k}`", f"{v:.1%}"] for i, (k, v) in enumerate(top)],
            ),
        ]
        if native:
            lines += [
                "\nThe same samples by nearest Python caller (-> the C function it was in):\n",
                h.md_table(
                    ["#", "Python function (file) -> native leaf", "share"],
                    [[i + 1, f"`{k}`", f"{v:.1%}"] for i, (k, v) in enumerate(top_py)],
                ),
            ]
        return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the whole run


def run(
    smoke: bool, workers: Sequence[int] = (2, 1), with_postfix: bool = True,
    cases: Sequence[str] | None = None, repeat: int = 1,
) -> list[Row]:  # fmt: skip
    """Every case: the tools' ceiling, fastmta per worker count, Postfix; ``repeat`` rounds
    (interleaved, so load from elsewhere hits every MTA alike), the best of each kept."""
    rows: list[Row] = []
    pause = 0.5 if smoke else 5.0
    for case in SMOKE if smoke else FULL:
        if cases and case.name not in cases:
            continue
        for rnd in range(1, repeat + 1):
            h.say(f"e2e {case.name}: {case.title}" + (f" (round {rnd}/{repeat})" * (repeat > 1)))
            tools = ["smtp-source", "loadgen"] if case.domains else ["smtp-source"]
            for tool in tools:
                rows.append(ceiling(case, tool))
                h.say(f"  ceiling {tool} -> smtp-sink: {rows[-1].rate:,.0f} msg/s {rows[-1].note}")
            rows.append(relay_ceiling(case))
            h.say(f"  {RELAY_CEILING}: {rows[-1].rate:,.0f} msg/s {rows[-1].note}")
            h.run_mtas(rows, case, workers, with_postfix, run_fastmta, run_postfix, _line, pause)
    return h.best_of(rows)


def _line(r: Row) -> str:
    if not r.ok:
        return f"{r.who}: FAILED {r.note}"
    return (
        f"{r.who}: {r.arrived} at the sink(s) in {r.wall:.2f} s = {r.rate:,.0f} msg/s, "
        f"{r.cpu_per_1000:.2f} CPU s/1000, peak RSS {r.peak_rss / 2**20:.0f} MiB"
    )


def _ceiling(group: Sequence[Row]) -> float:
    """The ceiling of the load tool the MTAs got in this case (0 if it was not measured)."""
    want = f"ceiling {_tool(group[0].case)}"
    return next((r.rate for r in group if r.who == want and r.ok), 0.0)


def goals(rows: Sequence[Row]) -> str:
    """The goal per case: >= 10x Postfix's msg/s, or >= 60% of the tools' ceiling where 10x
    Postfix is above it; and less CPU per message than Postfix."""
    out = []
    for name in dict.fromkeys(r.case.name for r in rows):
        group = [r for r in rows if r.case.name == name]
        pf = next((r for r in group if r.who == "postfix" and r.ok), None)
        ceil = _ceiling(group)
        runs = [r for r in group if r.who.startswith("fastmta") and r.ok]
        if not pf or not runs:
            continue
        best = max(runs, key=lambda r: r.rate)
        target = 10 * pf.rate
        if ceil and target > ceil:
            target, why = 0.6 * ceil, "60% of the tools' ceiling (10x Postfix is above it)"
        else:
            why = "10x Postfix"
        met = "met" if best.rate >= target else "NOT met"
        cpu = "less" if best.cpu_per_1000 < pf.cpu_per_1000 else "NOT less"
        line = (
            f"- {group[0].case.title}: goal {why} = {target:,.0f} msg/s: {met} "
            f"({best.who} {best.rate:,.0f} msg/s = {best.rate / pf.rate:.1f}x Postfix); "
            f"CPU per message {cpu} than Postfix ({best.cpu_per_1000:.2f} vs "
            f"{pf.cpu_per_1000:.2f} s/1000)"
        )
        relay = next((r for r in group if r.who == RELAY_CEILING and r.ok), None)
        if relay is not None:
            line += (
                f". Relay ceiling {relay.rate:,.0f} msg/s: fastmta reaches "
                f"{best.rate / relay.rate:.0%} of it"
            )
            if target > relay.rate:
                line += ", and the goal lies above it: no relay between these tools reaches it here"
        out.append(line)
    return "\n".join(out)


def table(rows: Sequence[Row]) -> str:
    """The markdown result table, with ratios against Postfix and the tools' ceiling."""
    out = []
    header = [
        "case", "MTA / tool", "msg/s", "wall s", "MTA CPU s / 1000 msgs", "peak RSS MiB (PSS)",
        "load tool CPU s", "vs Postfix msg/s", "vs Postfix CPU/msg", "% of ceiling", "note",
    ]  # fmt: skip
    for name in dict.fromkeys(r.case.name for r in rows):
        group = [r for r in rows if r.case.name == name]
        pf = next((r for r in group if r.who == "postfix" and r.ok), None)
        ceil = _ceiling(group)
        lines = []
        for r in group:
            is_mta = "ceiling" not in r.who
            vs = f"{r.rate / pf.rate:.1f}x" if pf and is_mta and r.ok else ""
            cpu_vs = (
                f"{pf.cpu_per_1000 / r.cpu_per_1000:.1f}x less"
                if pf and is_mta and r.ok and r.cpu_per_1000 > 0
                else ""
            )
            pct = f"{100 * r.rate / ceil:.0f}%" if ceil and is_mta and r.ok else ""
            mem = f"{r.peak_rss / 2**20:.0f} ({r.peak_pss / 2**20:.0f})" if is_mta and r.ok else ""
            lines.append([
                r.case.title, r.who, f"{r.rate:,.0f}" if r.ok else "FAILED",
                f"{r.wall:.2f}" if r.ok else "", f"{r.cpu_per_1000:.2f}" if is_mta and r.ok else "",
                mem, f"{r.load_cpu:.2f}", vs, cpu_vs, pct, r.note.replace("|", "/")[:120],
            ])  # fmt: skip
        out += lines
    return h.md_table(header, out)


def report(rows: Sequence[Row], smoke: bool) -> str:
    sink = "Postfix smtp-sink (one per domain in the 10-recipient case)"
    text = (
        f"## End-to-end: load tool -> MTA -> sink{' (SMOKE counts)' if smoke else ''}\n\n"
        f"{h.machine_md()}\n- sink: {sink}\n"
        "- load: smtp-source -s 20 (one message per connection); 10-recipient case: "
        "harness.py loadgen (20 sessions, one transaction per connection, MAIL/RCPT/DATA "
        "pipelined), same for both MTAs\n"
        "- ceilings: the load tool straight into smtp-sink (the issue's ceiling); relay ceiling: "
        "two pairs at once, the load tool -> smtp-sink and smtp-source -> another smtp-sink "
        "with what the relay sends on (10-recipient case: 10 single-recipient transactions per "
        "message over reused connections, smtp-source -d). A relay receives like one sink and "
        "sends like one source, so even an MTA that cost no CPU could not pass the relay "
        "ceiling on this machine\n"
        "- durability: fsync before 250 in both; fastmta delivery.tls = none, Postfix "
        "smtp_tls_security_level = none\n"
        "- CPU: MTA process tree (utime+stime, reaped children included), from load start "
        "until the sinks had every message; RSS summed over the tree, sampled every 50 ms\n\n"
        f"{table(rows)}\n\nGoals:\n\n{goals(rows)}\n\n"
        f"Worker count (fastmta):\n\n{h.workers_verdict(rows)}\n"
    )
    return text


def main(argv: Sequence[str] | None = None) -> int:
    ap = h.bench_args("bench_e2e.py", __doc__)
    ap.add_argument("--case", action="append", choices=[c.name for c in FULL])
    ap.add_argument("--profile", action="store_true", help="only profile fastmta (1 KiB, py-spy)")
    ap.add_argument("--native", action="store_true", help="with --profile: C frames too")
    args = ap.parse_args(argv)
    smoke = args.smoke or h.smoke_requested([])
    if args.profile:
        text = profile_fastmta((SMOKE if smoke else FULL)[0], native=args.native)
        h.publish("profile-native" if args.native else "profile", text, args, smoke)
        return 0
    with_postfix = not args.no_postfix and ensure_postfix(h.say)
    workers = [int(w) for w in args.workers.split(",") if w]
    rows = run(smoke, workers, with_postfix, args.case, max(1, args.repeat))
    h.publish("e2e", report(rows, smoke), args, smoke)
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
