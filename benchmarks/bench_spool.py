"""Spool benchmarks: store throughput with fsync on, and recovery scan speed.

    python benchmarks/bench_spool.py            # full run (a few seconds per case)
    python benchmarks/bench_spool.py --smoke    # tiny counts, checks it works
    python benchmarks/bench_spool.py --loop asyncio

Store: `concurrency` tasks each store messages back to back (as SMTP sessions would), so the
writer group-commits whatever arrives during each fdatasync (on its I/O thread). Recovery: open() of a spool
holding `recover_count` live 1 KiB messages (written with fsync off to save time).
Bounded in count and time; writes only under a temporary directory.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastmta.config import Config, load_config  # noqa: E402
from fastmta.spool import Envelope, Recipient, Spool, new_queue_id  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402


def envelope() -> Envelope:
    return Envelope(
        new_queue_id(),
        "bounce-123@sender.example.org",
        [Recipient("someone@example.com", notify="FAILURE")],
        time.time(),
        body="8BITMIME",
        client="[127.0.0.1] client.example",
    )


async def bench_store(directory: str, size: int, count: int, concurrency: int, limit_s: float):
    data = (b"x" * 76 + b"\r\n") * (size // 78) + b"y" * (size % 78)
    sp = Spool(directory)
    await sp.open()
    remaining = count
    deadline = time.monotonic() + limit_s

    async def producer():
        nonlocal remaining
        while remaining > 0 and time.monotonic() < deadline:
            remaining -= 1
            await sp.store(envelope(), data)

    t0 = time.perf_counter()
    await asyncio.gather(*(producer() for _ in range(concurrency)))
    dt = time.perf_counter() - t0
    st = sp.stats
    await sp.close()
    return st.messages / dt, st.messages, st.fsyncs, st.bytes / dt / 1e6


async def build(directory: str, count: int) -> None:
    data = b"z" * 1022 + b"\r\n"
    sp = Spool(directory, fsync=False)
    await sp.open()
    for i in range(0, count, 1000):
        await asyncio.gather(*(sp.store(envelope(), data) for _ in range(min(1000, count - i))))
    await sp.close()


def _rss() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) * 1024


def _worker_config(root: str, resident: int) -> Config:
    """One worker over ``root`` with delivery held and queue.max_resident = ``resident``."""
    return load_config(
        None,
        {
            "server": {"spool_dir": root, "hold_delivery": True, "workers": 1},
            "listener": [{"address": f"127.0.0.1:{h.free_port()}"}],
            "queue": {"max_resident": resident},
        },
    )


async def bench_memory(root: str, count: int, resident: int) -> list[tuple[int, float]]:
    """A whole worker (spool, scheduler, engine; delivery held, queue.max_resident =
    ``resident``) taking in ``count`` 1 KiB messages: its RSS growth (bytes) after each
    tenth of them, once parking has settled. Flat past ``resident`` means parking works."""
    from fastmta.app import Worker  # noqa: PLC0415

    config = _worker_config(root, resident)
    worker = Worker(config)
    await worker.start()
    spool, engine = worker.spool, worker.engine
    data = b"z" * 1022 + b"\r\n"
    before = _rss()
    out = []
    step = max(1000, count // 10)
    for n in range(0, count, 1000):
        stored = await asyncio.gather(*(spool.store(envelope(), data) for _ in range(1000)))
        for sm in stored:
            engine.submit(sm)
        if (n + 1000) % step == 0:
            while engine.stats.in_memory + len(spool) > resident or engine._balancing:
                await asyncio.sleep(0.01)
            out.append((n + 1000, float(_rss() - before)))
    assert engine.stats.queued == count, engine.stats
    await worker.stop()
    return out


async def bench_restart(root: str, count: int, resident: int) -> tuple[float, float]:
    """A worker starting over the spool bench_memory left (``count`` queued, most parked):
    (start seconds, RSS growth bytes). Neither should grow with the parked part."""
    from fastmta.app import Worker  # noqa: PLC0415

    config = _worker_config(root, resident)
    before = _rss()
    t0 = time.perf_counter()
    worker = Worker(config)
    await worker.start()
    dt = time.perf_counter() - t0
    grown = _rss() - before
    assert worker.engine.stats.queued == count, worker.engine.stats
    await worker.stop()
    return dt, float(grown)


def _in_fresh_process(mode: str, root: str, count: int, resident: int) -> list[str]:
    """bench_memory (``--memory``) or bench_restart (``--restart``) in a new interpreter, so
    RSS is not blurred by what earlier cases freed; returns what it printed, split."""
    import subprocess  # noqa: PLC0415

    argv = [sys.executable, os.path.abspath(__file__), mode, root, str(count), str(resident)]
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.split()


async def bench_recover(directory: str, count: int):
    await build(directory, count)
    sp = Spool(directory)
    t0 = time.perf_counter()
    live = await sp.open()
    dt = time.perf_counter() - t0
    await sp.close()
    assert len(live) == count, (len(live), count)
    return count / dt, dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny counts")
    ap.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    ap.add_argument("--dir", default=None, help="parent of the temporary spools (default: TMPDIR)")
    ap.add_argument("--concurrency", type=int, default=100)
    ap.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    ap.add_argument("--memory", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--restart", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.restart:  # the child of _restart_in_fresh_process
        root, count, resident = args.restart
        print(*asyncio.run(bench_restart(root, int(count), int(resident))))
        return
    if args.memory:  # the child of _memory_in_fresh_process
        root, count, resident = args.memory
        for n, grown in asyncio.run(bench_memory(root, int(count), int(resident))):
            print(n, grown)
        return
    if args.loop == "uvloop":
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    else:
        runner = asyncio.Runner()
    n1k, n50k, nrec = (500, 200, 2000) if args.smoke else (50_000, 10_000, 100_000)
    base = tempfile.mkdtemp(prefix="bench-spool-", dir=args.dir)
    rows = []
    try:
        with runner:
            for size, n in ((1024, n1k), (50 * 1024, n50k)):
                d = os.path.join(base, f"store{size}")
                rate, msgs, fsyncs, mbs = runner.run(
                    bench_store(d, size, n, args.concurrency, 20.0)
                )
                print(
                    f"store {size // 1024:>3} KiB  fsync=on  concurrency={args.concurrency}: "
                    f"{rate:>9,.0f} msgs/s  ({msgs} msgs, {fsyncs} fsyncs, "
                    f"{msgs / max(fsyncs, 1):.0f} msgs/fsync, {mbs:.0f} MB/s)"
                )
                rows.append([f"store {size // 1024} KiB, fsync on", f"{rate:,.0f}",
                             f"{msgs:,} msgs, {msgs / max(fsyncs, 1):.0f} per fdatasync, "
                             f"{mbs:.0f} MB/s"])  # fmt: skip
                shutil.rmtree(d)
            rate, dt = runner.run(bench_recover(os.path.join(base, "recover"), nrec))
            print(f"recover {nrec} x 1 KiB: {rate:>9,.0f} msgs/s  ({dt:.2f} s)")
            rows.append([f"recover {nrec:,} x 1 KiB", f"{rate:,.0f}", f"{dt:.2f} s"])
            nmem, resident = (3000, 1000) if args.smoke else (200_000, 20_000)
            t0 = time.perf_counter()
            out = _in_fresh_process("--memory", os.path.join(base, "memory"), nmem, resident)
            grown = [(int(out[i]), float(out[i + 1])) for i in range(0, len(out), 2)]
            dt = time.perf_counter() - t0
            for n, g in grown:
                print(f"worker memory with {n:>7,} queued (max_resident {resident:,}): "
                      f"+{g / 2**20:6.1f} MiB")  # fmt: skip
            at_cap = next((g for n, g in grown if n >= resident), grown[0][1])
            half_n, half = grown[len(grown) // 2 - 1]
            end_n, end = grown[-1]
            per_msg = (end - half) / max(1, end_n - half_n)
            rows.append([f"worker taking in {nmem:,} x 1 KiB, delivery held, "
                         f"queue.max_resident {resident:,}", f"{nmem / dt:,.0f}",
                         f"RSS growth at {resident:,} queued {at_cap / 2**20:.1f} MiB, at "
                         f"{half_n:,} {half / 2**20:.1f} MiB, at {end_n:,} {end / 2**20:.1f} "
                         f"MiB: {per_msg:,.0f} bytes per message from {half_n:,} to {end_n:,} "
                         "(the rest is parked on disk)"])  # fmt: skip
            out = _in_fresh_process("--restart", os.path.join(base, "memory"), nmem, resident)
            t_start, g_start = float(out[0]), float(out[1])
            print(f"worker restart over {nmem:,} queued: {t_start:.2f} s, "
                  f"+{g_start / 2**20:.1f} MiB")  # fmt: skip
            rows.append([f"worker restart over those {nmem:,} queued (the log replayed, parked "
                         "files only listed)", f"{nmem / t_start:,.0f}", f"{t_start:.2f} s, RSS "
                         f"growth {g_start / 2**20:.1f} MiB"])  # fmt: skip
    finally:
        shutil.rmtree(base, ignore_errors=True)
    if not args.smoke and not args.no_write:
        h.write_section(
            "spool",
            "## Spool: group-committed stores and recovery\n\n"
            f"{h.machine_md()}\n- `python benchmarks/bench_spool.py`: {args.concurrency} "
            f"concurrent store() calls, {args.loop}\n\n"
            + h.md_table(["case", "msgs/s", "detail"], rows)
            + "\n",
        )


if __name__ == "__main__":
    main()
