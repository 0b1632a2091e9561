"""Shared machinery of the fastmta-vs-Postfix benchmarks (bench_ingest.py, bench_e2e.py,
bench_drain.py).

What it gives:

- ``Procs``: every process a benchmark starts, stopped by PID in a ``finally`` (SIGTERM, then
  SIGKILL after a timeout); ``wait_exits`` waits (bounded) for several processes and records
  when each exited and, through wait4(2), the CPU it used.
- ``TreeMeter``: CPU seconds (utime+stime of every process of a tree, plus what reaped children
  left in cutime/cstime) and peak memory (summed RSS and PSS, sampled every 50 ms) of an MTA.
- ``start_fastmta`` / ``fastmta_config``: ``fastmta serve`` as a subprocess from this checkout.
- ``start_smtp_sink``: Postfix's smtp-sink, exiting after N messages (``-M``).
- ``smtp_source``: the command line of Postfix's smtp-source.
- ``loadgen``: our own load generator (``python harness.py loadgen ...``): like smtp-source,
  N sessions, one transaction per connection, but each recipient may be in another domain.
- ``machine_info``, ``write_section``: the RESULTS.md header and section merge.

Only loopback addresses are used. Every wait has a timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
PYTHON = sys.executable
RESULTS_MD = os.path.join(HERE, "RESULTS.md")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
STOP_TIMEOUT = 30.0  # seconds a process gets after SIGTERM before SIGKILL
SAMPLE_INTERVAL = 0.05  # seconds between memory samples


@dataclass
class Row:
    """One measured run of a case: an MTA under load, or the load tools' own ceiling."""

    case: Any  # the benchmark's Case (only .count is used here)
    who: str  # "fastmta w=2", "postfix", "ceiling smtp-source", ...
    ok: bool
    wall: float = 0.0
    arrived: int = 0  # messages (transactions at the sinks, or found in the queue)
    mta_cpu: float = 0.0
    load_cpu: float = 0.0
    peak_rss: int = 0
    peak_pss: int = 0
    note: str = ""

    @property
    def rate(self) -> float:
        return self.case.count / self.wall if self.ok and self.wall > 0 else 0.0

    @property
    def cpu_per_1000(self) -> float:
        return self.mta_cpu / self.case.count * 1000 if self.ok else 0.0


def smoke_requested(argv: Sequence[str] | None = None) -> bool:
    """Smoke mode: ``--smoke`` on the command line or FASTMTA_BENCH_SMOKE=1."""
    argv = sys.argv[1:] if argv is None else argv
    env = os.environ.get("FASTMTA_BENCH_SMOKE", "").lower() in ("1", "true", "yes")
    return env or "--smoke" in argv


def bench_args(prog: str, doc: str) -> argparse.ArgumentParser:
    """The options every fastmta-vs-Postfix benchmark takes (a benchmark may add its own)."""
    ap = argparse.ArgumentParser(prog=prog, description=doc.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny counts (also FASTMTA_BENCH_SMOKE=1)")
    ap.add_argument("--workers", default="2,1", help="fastmta worker counts to run (2,1)")
    ap.add_argument("--no-postfix", action="store_true", help="skip Postfix")
    ap.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    ap.add_argument("--repeat", type=int, default=1, help="rounds per case; the best is kept")
    return ap


def bench_main(section: str, doc: str, run: Callable, report: Callable, argv=None) -> int:
    """``main`` of a benchmark with only the common options: ``run(smoke, workers,
    with_postfix, repeat)`` -> rows, ``report(rows, smoke)`` -> text for section ``section``."""
    from postfix import ensure_postfix

    args = bench_args(f"bench_{section}.py", doc).parse_args(argv)
    smoke = args.smoke or smoke_requested([])
    with_postfix = not args.no_postfix and ensure_postfix(say)
    workers = [int(w) for w in args.workers.split(",") if w]
    rows = run(smoke, workers, with_postfix, max(1, args.repeat))
    publish(section, report(rows, smoke), args, smoke)
    return 0 if all(r.ok for r in rows) else 1


def publish(section: str, text: str, args: argparse.Namespace, smoke: bool) -> None:
    """Print a benchmark's report and (unless smoke or --no-write) put it into RESULTS.md."""
    print("\n" + text, flush=True)
    if not args.no_write and not smoke:
        write_section(section, text)


def say(text: str) -> None:
    """A progress line (flushed, timestamped)."""
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


# ---------------------------------------------------------------------------- ports, sockets


def free_port(host: str = "127.0.0.1", udp_too: bool = False) -> int:
    """A port free on ``host`` for TCP (and UDP when asked). Racy by nature; good enough here."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if not udp_too:
            return port
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                u.bind((host, port))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port")


def listeners(port: int) -> int:
    """How many TCP sockets LISTEN on ``port`` (any IPv4 address), from /proc/net/tcp."""
    n = 0
    want = f":{port:04X}"
    with open("/proc/net/tcp", encoding="ascii") as f:
        next(f)
        for line in f:
            parts = line.split()
            if parts[1].endswith(want) and parts[3] == "0A":
                n += 1
    return n


def wait_listening(port: int, count: int = 1, timeout: float = 30.0, proc=None) -> None:
    """Wait until ``count`` sockets listen on ``port``; raise if ``proc`` dies or on timeout."""
    deadline = time.monotonic() + timeout
    while listeners(port) < count:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited ({proc.returncode}) before listening")
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listening on port {port} after {timeout:.0f} s")
        time.sleep(0.02)


# ---------------------------------------------------------------------------- processes


@dataclass
class Exit:
    """How a waited-for process ended: when (perf_counter), status, CPU seconds (wait4)."""

    at: float
    code: int
    cpu: float


class Procs:
    """Processes started by a benchmark; ``stop_all`` (call it in ``finally``) stops them by PID,
    after the cleanups registered with ``at_stop`` (e.g. a private Postfix's ``postfix stop``)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self._cleanups: list[Callable[[], None]] = []

    def at_stop(self, fn: Callable[[], None]) -> None:
        self._cleanups.append(fn)

    def start(self, cmd: Sequence[str], *, log: str | None = None, **kw) -> subprocess.Popen:
        out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - closed by the child
        try:
            p = subprocess.Popen(
                list(cmd), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **kw
            )
        finally:
            if log:
                out.close()
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen, timeout: float = STOP_TIMEOUT) -> None:
        if p.returncode is not None or p.poll() is not None:
            return
        try:
            p.send_signal(signal.SIGTERM)
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)
        except ProcessLookupError:
            pass

    def stop_all(self) -> None:
        while self._cleanups:
            self._cleanups.pop()()
        for p in reversed(self.procs):
            self.stop(p)
        self.procs.clear()


@contextlib.contextmanager
def scratch(prefix: str) -> Iterator[tuple[Procs, str]]:
    """One measured run's processes and scratch directory: on the way out, however it goes,
    every process is stopped (by PID) and the directory removed."""
    procs = Procs()
    base = tempfile.mkdtemp(prefix=prefix)
    try:
        yield procs, base
    finally:
        procs.stop_all()
        shutil.rmtree(base, ignore_errors=True)


def wait_exits(procs: Sequence[subprocess.Popen], timeout: float) -> dict[int, Exit]:
    """Wait for every process in ``procs`` (bounded by ``timeout``); pid -> Exit for those that
    exited. CPU comes from wait4(2), so this reaps them (their ``returncode`` is set)."""
    out: dict[int, Exit] = {}
    deadline = time.perf_counter() + timeout
    pending = {p.pid: p for p in procs if p.returncode is None}
    while pending and time.perf_counter() < deadline:
        for pid, p in list(pending.items()):
            try:
                got, status, ru = os.wait4(pid, os.WNOHANG)
            except ChildProcessError:
                got, status, ru = pid, 0, None
            if got == 0:
                continue
            now = time.perf_counter()
            code = os.waitstatus_to_exitcode(status)
            p.returncode = code
            cpu = (ru.ru_utime + ru.ru_stime) if ru is not None else 0.0
            out[pid] = Exit(now, code, cpu)
            del pending[pid]
        if pending:
            time.sleep(0.002)
    return out


# ---------------------------------------------------------------------------- CPU and memory


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        kids.setdefault(ppid, []).append(int(name))
    return kids


def tree(root: int) -> list[int]:
    """``root`` and all its descendants (alive now)."""
    kids = _children_map()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, ()))
    return out


def _cpu_of(pid: int) -> float:
    """utime+stime+cutime+cstime of ``pid`` in seconds (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(b")") + 2 :].split()
    return sum(int(x) for x in fields[11:15]) / CLK_TCK


def _mem_of(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of ``pid`` in bytes."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Rss:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith(b"Pss:"):
                    pss = int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss, pss


def thread_cpu(root: int) -> dict[str, float]:
    """CPU seconds so far per kind of thread in the tree under ``root``: "event loop" (the
    main thread of each process) and "other threads" (spool writer, executor), by /proc task."""
    out = {"event loop (main threads)": 0.0, "other threads (spool I/O, executor)": 0.0}
    for pid in tree(root):
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat[stat.rindex(b")") + 2 :].split()
            cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
            main = "event loop (main threads)"
            key = main if tid == str(pid) else "other threads (spool I/O, executor)"
            out[key] += cpu
    return out


class TreeMeter:
    """CPU and peak memory of the process tree under ``root`` (an MTA) between start and stop.

    CPU: the sum over the tree of utime+stime plus cutime+cstime (which holds what exited and
    reaped children used: Postfix's master reaps smtpd/cleanup/smtp processes), stop - start.
    Memory: the largest sum of RSS (and of PSS, which splits shared pages fairly) over the tree
    seen by a sampler thread every ``interval`` seconds.
    """

    def __init__(self, root: int, interval: float = SAMPLE_INTERVAL) -> None:
        self.root = root
        self.interval = interval
        self.cpu0 = 0.0
        self.cpu = 0.0
        self.peak_rss = 0
        self.peak_pss = 0
        self.peak_procs = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def cpu_now(self) -> float:
        return sum(_cpu_of(p) for p in tree(self.root))

    def start(self) -> None:
        self.cpu0 = self.cpu_now()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            pids = tree(self.root)
            rss = pss = 0
            for p in pids:
                r, s = _mem_of(p)
                rss += r
                pss += s
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_pss = max(self.peak_pss, pss)
            self.peak_procs = max(self.peak_procs, len(pids))
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self.cpu = self.cpu_now() - self.cpu0
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)


# ---------------------------------------------------------------------------- fastmta


def fastmta_config(
    base: str,
    port: int,
    *,
    workers: int,
    hold: bool,
    relayhost: str = "",
    delivery_port: int = 25,
    nameservers: Sequence[str] = (),
    chain_transactions: bool = True,
    extra: str = "",
) -> str:
    """Write ``base``/fastmta.toml and return its path (spool under ``base``/spool);
    ``extra``: more TOML (whole tables) at the end."""
    lines = [
        "[server]",
        'hostname = "fastmta-bench.test"',
        f"workers = {workers}",
        f'spool_dir = "{base}/spool"',
        f"hold_delivery = {'true' if hold else 'false'}",
        f'log_file = "{base}/fastmta.log"',
        "",
        "[[listener]]",
        f'address = "127.0.0.1:{port}"',
        'role = "relay"',
        'tls = "none"',
        "",
        "[limits]",
        "max_connections_per_ip = 1000",
        "",
        "[delivery]",
        'tls = "none"',
        f"chain_transactions = {'true' if chain_transactions else 'false'}",
        f'relayhost = "{relayhost}"',
        f"port = {delivery_port}",
        "",
        "[dns]",
        "nameservers = [" + ", ".join(f'"{n}"' for n in nameservers) + "]",
        extra,
    ]
    path = os.path.join(base, "fastmta.toml")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


def launch_fastmta(procs: Procs, base: str, config: str) -> subprocess.Popen:
    """``fastmta serve --config`` from this checkout, started (not yet listening)."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return procs.start(
        [PYTHON, "-m", "fastmta.cli", "serve", "--config", config],
        log=os.path.join(base, "fastmta.out"),
        cwd=REPO,
        env=env,
    )


def start_fastmta(procs: Procs, base: str, config: str, port: int, workers: int):
    """``fastmta serve --config`` from this checkout; returns when every worker listens."""
    p = launch_fastmta(procs, base, config)
    wait_listening(port, workers, timeout=30, proc=p)
    return p


def stop_fastmta(procs: Procs, p: subprocess.Popen) -> None:
    procs.stop(p, timeout=60)


def count_fastmta_spool(spool_dir: str) -> int:
    """Messages live in a stopped fastmta's spool (all shards), via the spool's recovery scan."""
    sys.path.insert(0, REPO)
    from fastmta.spool.recover import recover

    n = 0
    for name in sorted(os.listdir(spool_dir)):
        path = os.path.join(spool_dir, name)
        if name.startswith("shard-") and os.path.isdir(path):
            n += len(recover(path, readonly=True).messages)
    return n


def parser_kind() -> str:
    sys.path.insert(0, REPO)
    try:
        from fastmta.protocol.parse import IMPLEMENTATION

        return str(IMPLEMENTATION)
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        return f"unknown ({e})"


# ---------------------------------------------------------------------------- Postfix tools


def sink_user() -> str:
    import pwd

    for name in ("postfix", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    return "nobody"


class SmtpSink:
    """Postfix's smtp-sink on host:port with its running counter (``-c``) read by a thread.

    ``reached`` is the perf_counter time at which the counter first showed ``expect`` messages
    (the sink counts a message when it receives the final "."); ``count`` is the latest count.
    smtp-sink's own ``-M`` exit comes up to a second late, so it is not used: stop it by PID.
    """

    _MESG = re.compile(rb"mesg=(\d+)")

    def __init__(self, procs: Procs, host: str, port: int, expect: int) -> None:
        cmd = ["smtp-sink", "-c"]
        if os.geteuid() == 0:
            cmd += ["-u", sink_user()]
        self.expect = expect
        self.count = 0
        self.reached: float | None = None
        self._event = threading.Event()
        self.proc = subprocess.Popen(
            [*cmd, f"{host}:{port}", "1024"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
        procs.procs.append(self.proc)
        self.port = port
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        fd = self.proc.stdout.fileno()
        tail = b""
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:
                break
            if not data:
                break
            chunk = tail + data
            cut = chunk.rfind(b"\r")
            if cut < 0:
                tail = chunk[-256:]
                continue
            tail = chunk[cut + 1 :]
            found = self._MESG.findall(chunk, 0, cut)
            if found:
                self.count = int(found[-1])
                if self.reached is None and self.count >= self.expect:
                    self.reached = time.perf_counter()
                    self._event.set()
        self._event.set()

    def wait(self, timeout: float) -> float | None:
        """Wait (bounded) until ``expect`` messages arrived; the time they had, or None."""
        self._event.wait(timeout)
        return self.reached


def start_smtp_sink(procs: Procs, host: str, port: int, expect: int) -> SmtpSink:
    """Postfix's smtp-sink on host:port, counting towards ``expect`` (see SmtpSink)."""
    return SmtpSink(procs, host, port, expect)


def wait_sinks(sinks: Sequence[SmtpSink], timeout: float) -> float | None:
    """Time (perf_counter) when the last of ``sinks`` had its messages, None on timeout."""
    deadline = time.perf_counter() + timeout
    last = 0.0
    for s in sinks:
        t = s.wait(max(0.0, deadline - time.perf_counter()))
        if t is None:
            return None
        last = max(last, t)
    return last


def smtp_source(
    port: int, count: int, size: int, sessions: int = 20, rcpts: int = 1, reuse: bool = False
) -> list[str]:
    """smtp-source: ``sessions`` parallel sessions, one message per connection, or with
    ``reuse`` (``-d``) every message of a session over one connection."""
    cmd = ["smtp-source", "-s", str(sessions), "-m", str(count), "-l", str(size)]
    if reuse:
        cmd.append("-d")
    if rcpts > 1:
        cmd += ["-r", str(rcpts)]
    return [*cmd, "-f", "from@x.test", "-t", "to@y.test", f"127.0.0.1:{port}"]


def loadgen_cmd(
    port: int, count: int, size: int, domains: Sequence[str], sessions: int = 20
) -> list[str]:
    """Our load generator as a command line (see ``loadgen``)."""
    return [
        PYTHON,
        os.path.abspath(__file__),
        "loadgen",
        "--port",
        str(port),
        "--count",
        str(count),
        "--size",
        str(size),
        "--sessions",
        str(sessions),
        "--domains",
        ",".join(domains),
    ]


@dataclass
class LoadResult:
    """A load run: wall seconds (start to the load tool's exit), its exit, and its CPU."""

    wall: float
    code: int
    cpu: float
    extra: dict = field(default_factory=dict)


def run_load(procs: Procs, cmd: Sequence[str], timeout: float) -> LoadResult:
    """Run a load tool to completion (bounded); wall clock from start to exit."""
    t0 = time.perf_counter()
    p = procs.start(cmd)
    ex = wait_exits([p], timeout).get(p.pid)
    if ex is None:
        procs.stop(p)
        raise TimeoutError(f"{cmd[0]} did not finish in {timeout:.0f} s")
    return LoadResult(ex.at - t0, ex.code, ex.cpu)


# ---------------------------------------------------------------------------- our load generator


def message_bytes(index: int, size: int, rcpts: Sequence[str]) -> bytes:
    """A message of about ``size`` octets (headers + lines of 'X'), dot-terminated."""
    head = (
        f"From: <from@x.test>\r\nTo: <{rcpts[0]}>\r\nSubject: bench {index}\r\n"
        f"Message-ID: <{index}.{os.getpid()}@loadgen.test>\r\n\r\n"
    ).encode()
    body = b""
    left = max(0, size - len(head))
    line = b"X" * 76 + b"\r\n"
    body = line * (left // len(line))
    rest = left - len(body)
    if rest >= 3:
        body += b"X" * (rest - 2) + b"\r\n"
    return head + body + b".\r\n"


class _Client(asyncio.Protocol):
    """Counts final reply lines (``NNN `` after a CRLF); ``need(n)`` waits for n of them."""

    def __init__(self) -> None:
        self.buf = b""
        self.finals: list[bytes] = []
        self.want = 0
        self.waiter: asyncio.Future | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            i = self.buf.find(b"\r\n")
            if i < 0:
                break
            line, self.buf = self.buf[:i], self.buf[i + 2 :]
            if len(line) < 4 or line[3:4] == b" ":
                self.finals.append(line)
        if self.waiter and not self.waiter.done() and len(self.finals) >= self.want:
            self.waiter.set_result(None)

    def connection_lost(self, exc) -> None:
        if self.waiter and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection lost"))

    async def need(self, n: int, timeout: float) -> list[bytes]:
        if len(self.finals) < n:
            self.want = n
            self.waiter = asyncio.get_running_loop().create_future()
            await asyncio.wait_for(self.waiter, timeout)
        got, self.finals = self.finals[:n], self.finals[n:]
        return got


async def _loadgen(args: argparse.Namespace) -> tuple[int, int]:
    domains = args.domains.split(",")
    counter = iter(range(args.count))
    sent = failed = 0
    bodies: dict[int, bytes] = {}
    loop = asyncio.get_running_loop()

    async def session() -> None:
        nonlocal sent, failed
        for i in counter:
            rcpts = [f"u{i}@{d}" for d in domains]
            body = bodies.get(0) or bodies.setdefault(0, message_bytes(0, args.size, rcpts))
            try:
                transport, c = await loop.create_connection(_Client, args.host, args.port)
            except OSError:
                failed += 1
                continue
            try:
                await c.need(1, args.timeout)  # 220
                transport.write(b"EHLO loadgen.test\r\n")
                await c.need(1, args.timeout)
                # RFC 2920 pipelining: MAIL, every RCPT and DATA in one write.
                cmds = [b"MAIL FROM:<from@x.test>\r\n"]
                cmds += [f"RCPT TO:<{r}>\r\n".encode() for r in rcpts]
                cmds.append(b"DATA\r\n")
                transport.write(b"".join(cmds))
                replies = await c.need(len(cmds), args.timeout)
                if not replies[-1].startswith(b"354"):
                    failed += 1
                    transport.write(b"QUIT\r\n")
                    continue
                transport.write(body)
                end = await c.need(1, args.timeout)
                if end[0].startswith(b"250"):
                    sent += 1
                else:
                    failed += 1
                transport.write(b"QUIT\r\n")
                await c.need(1, args.timeout)
            except (TimeoutError, ConnectionError, OSError):
                failed += 1
            finally:
                transport.close()

    await asyncio.gather(*(session() for _ in range(args.sessions)))
    return sent, failed


def loadgen_main(argv: Sequence[str]) -> int:
    """``python harness.py loadgen``: N sessions, one transaction per connection, recipients
    ``u<i>@<domain>`` for each domain in ``--domains``; exit 0 when every message got 250."""
    ap = argparse.ArgumentParser(prog="harness.py loadgen")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--domains", default="y.test")
    ap.add_argument("--timeout", type=float, default=60.0)
    args = ap.parse_args(argv)
    try:
        import uvloop

        run = uvloop.run
    except ImportError:
        run = asyncio.run
    t0 = time.perf_counter()
    sent, failed = run(_loadgen(args))
    dt = time.perf_counter() - t0
    print(f"loadgen: {sent} sent, {failed} failed in {dt:.3f} s: {sent / dt:.0f} msg/s")
    return 0 if failed == 0 else 1


# ---------------------------------------------------------------------------- DNS


def start_dns(procs: Procs, base: str, records: Sequence[str]) -> tuple[subprocess.Popen, int]:
    """The package's test DNS server with ``records`` (zone lines) on 127.0.0.1:<free port>."""
    zone = os.path.join(base, "zone.txt")
    with open(zone, "w", encoding="utf-8") as f:
        f.write("\n".join(records) + "\n")
    port = free_port(udp_too=True)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = procs.start(
        [PYTHON, "-m", "fastmta.testing.dnsserver", "--port", str(port), "--zone", zone],
        log=os.path.join(base, "dns.out"),
        cwd=REPO,
        env=env,
    )
    wait_listening(port, 1, timeout=20, proc=p)
    return p, port


# ---------------------------------------------------------------------------- profiling

_LINE_NO = re.compile(r":\d+\)$")
# Where a stack's time goes: the first matching frame file decides (checked in this order).
_CATEGORIES = [
    ("spool I/O thread", ("spool/_io", "fastmta-spool-io")),
    ("delivery", ("fastmta/delivery/", "protocol/client.py", "fastmta/queue/", "fastmta/dns/")),
    ("ingest", ("fastmta/server.py", "protocol/server.py", "protocol/parse")),
    ("spool (loop side)", ("fastmta/spool/",)),
]


def _frame_key(frame: str) -> str:
    """'func (path/file.py:12)' -> 'func (file.py)' with the path shortened to the package."""
    frame = _LINE_NO.sub(")", frame.strip())
    for cut in ("/fastmta/", "/site-packages/", "/lib/python3"):
        i = frame.find(cut)
        if i >= 0:
            j = frame.rfind("(", 0, i)
            frame = frame[: j + 1] + frame[i + 1 :]
            break
    return frame


def _nearest_python(frames: list[str]) -> str:
    """The innermost frame that is Python code, with the native leaf it was in (py-spy
    --native puts C frames such as ``write (libc.so.6)`` below the Python caller)."""
    leaf = _frame_key(frames[-1])
    for fr in reversed(frames):
        if ".py:" in fr or ".py)" in fr:
            key = _frame_key(fr)
            return key if key == leaf else f"{key} -> {leaf}"
    return leaf


def profile_summary(
    raw_path: str, top: int = 15
) -> tuple[list[tuple[str, float]], dict, list[tuple[str, float]]]:
    """From py-spy's raw (collapsed) output: the ``top`` functions by self time (share of all
    samples), the share of samples per category (ingest, delivery, spool, other), and the top
    by nearest Python caller (differs from the first only with native frames)."""
    self_time: dict[str, int] = {}
    by_py: dict[str, int] = {}
    cats: dict[str, int] = {}
    total = 0
    with open(raw_path, encoding="utf-8", errors="replace") as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not count.isdigit():
                continue
            n = int(count)
            total += n
            frames = stack.split(";")
            key = _frame_key(frames[-1])
            self_time[key] = self_time.get(key, 0) + n
            pkey = _nearest_python(frames)
            by_py[pkey] = by_py.get(pkey, 0) + n
            cat = "other (event loop, start-up, logging)"
            for name, needles in _CATEGORIES:
                if any(nd in fr for fr in frames for nd in needles):
                    cat = name
                    break
            cats[cat] = cats.get(cat, 0) + n
    if not total:
        return [], {}, []
    ranked = sorted(self_time.items(), key=lambda kv: -kv[1])[:top]
    ranked_py = sorted(by_py.items(), key=lambda kv: -kv[1])[:top]
    return (
        [(k, v / total) for k, v in ranked],
        {k: v / total for k, v in cats.items()},
        [(k, v / total) for k, v in ranked_py],
    )


# ---------------------------------------------------------------------------- reporting


def machine_info() -> dict[str, str]:
    cpu = "?"
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    ram = "?"
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            kb = int(f.readline().split()[1])
            ram = f"{kb / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    try:
        pf = subprocess.run(
            ["postconf", "-dh", "mail_version"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pf = "absent"
    try:
        with open("/proc/loadavg", encoding="ascii") as f:
            load = " / ".join(f.read().split()[:3])
    except OSError:
        load = "?"
    pressure = "?"
    try:
        with open("/proc/pressure/cpu", encoding="ascii") as f:
            some = f.readline().split()
            pressure = ", ".join(x.replace("=", " ") + "%" for x in some[2:4])
    except (OSError, IndexError):
        pass
    return {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "ram": ram,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "fastmta parser": parser_kind(),
        "postfix": pf or "absent",
        "load average 1/5/15 min at the end (other work shares this machine)": load,
        "CPU pressure (PSI some: time runnable tasks waited for a CPU)": pressure,
    }


def machine_md() -> str:
    info = machine_info()
    return "\n".join(f"- {k}: {v}" for k, v in info.items())


def write_section(name: str, text: str, path: str = RESULTS_MD) -> None:
    """Replace (or append) the block between ``<!-- begin NAME -->`` and ``<!-- end NAME -->``
    in RESULTS.md, keeping every other section of the file."""
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    block = f"{begin}\n{text.rstrip()}\n{end}\n"
    try:
        with open(path, encoding="utf-8") as f:
            old = f.read()
    except FileNotFoundError:
        old = "# fastmta benchmark results\n\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.S)
    new = pattern.sub(lambda _: block, old, count=1) if pattern.search(old) else None
    if new is None:
        new = old.rstrip() + "\n\n" + block
    with open(path, "w", encoding="utf-8") as f:
        f.write(new)


def md_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def best_of(rows: Sequence) -> list:
    """Keep, for each (case, who), the successful row with the highest rate (else the first),
    in first-seen order; ``runs`` tells how many were made. Rows: .case, .who, .ok, .rate."""
    groups: dict[tuple[str, str], list] = {}
    for r in rows:
        groups.setdefault((r.case.name, r.who), []).append(r)
    out = []
    for runs in groups.values():
        ok = [r for r in runs if r.ok]
        best = max(ok, key=lambda r: r.rate) if ok else runs[0]
        if len(runs) > 1:
            rates = ", ".join(f"{r.rate:,.0f}" if r.ok else "failed" for r in runs)
            best.note = (f"best of {len(runs)} ({rates}) " + best.note).strip()
        out.append(best)
    return out


def workers_verdict(rows: Sequence) -> str:
    """One line per case: which fastmta worker count was faster (rows have .case, .who, .rate,
    .ok, .cpu_per_1000)."""
    out = []
    for name in dict.fromkeys(r.case.name for r in rows):
        runs = [r for r in rows if r.case.name == name and r.who.startswith("fastmta w=") and r.ok]
        if len(runs) < 2:
            continue
        best = max(runs, key=lambda r: r.rate)
        others = ", ".join(
            f"{r.who}: {r.rate:,.0f} msg/s, {r.cpu_per_1000:.2f} CPU s/1000" for r in runs
        )
        out.append(f"- {runs[0].case.title}: fastest {best.who} ({others})")
    return "\n".join(out) or "- only one worker count was run"


def settle(seconds: float) -> None:
    """Let the disk settle between runs (sync, then a pause)."""
    os.sync()
    time.sleep(seconds)


def run_mtas(
    rows: list,
    case: object,
    workers: Sequence[int],
    with_postfix: bool,
    run_fastmta: Callable[[Any, int], object],
    run_postfix: Callable[[Any], object],
    line: Callable[[object], str],
    pause: float,
    variants: Sequence[Callable[[Any], object]] = (),
) -> None:
    """One round of a case for the MTAs: fastmta per worker count, then each of ``variants``
    (other fastmta set-ups), then Postfix, each row appended to ``rows`` and printed, the disk
    settling after each."""
    for run in [*(lambda c, w=w: run_fastmta(c, w) for w in workers), *variants]:
        rows.append(run(case))
        say(f"  -> {line(rows[-1])}")
        settle(pause)
    if with_postfix:
        rows.append(run_postfix(case))
        say(f"  -> {line(rows[-1])}")
        settle(pause * 2)


def self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "loadgen":
        sys.exit(loadgen_main(sys.argv[2:]))
    print("usage: harness.py loadgen --port N --count N [--size B] [--domains a,b]")
    sys.exit(64)
