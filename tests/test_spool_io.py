"""The spool's I/O thread, compiled (ext/_spoolio.pyx) and pure Python (_io_py): one contract."""

from __future__ import annotations

import errno
import os
import select
import sys
import time

import pytest

from fastmta.spool import _io_py, iothread

IMPLS = {"py": _io_py}
if iothread.ACCELERATED:
    from fastmta.spool import _io

    IMPLS["c"] = _io


@pytest.fixture(params=["c", "py"])
def impl(request):
    if request.param not in IMPLS:
        pytest.skip("the compiled I/O thread is not built")
    return IMPLS[request.param]


@pytest.fixture
def io(impl):
    t = impl.IoThread()
    t.start()
    yield t
    t.stop()
    t.join(5)


def wait(t, n: int, timeout: float = 5.0) -> list[tuple[int, int]]:
    """Collect n results, waiting on done_fd as the event loop does."""
    out: list[tuple[int, int]] = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        left = deadline - time.monotonic()
        assert left > 0, f"only {len(out)} of {n} results"
        select.select([t.done_fd], [], [], left)
        out += t.results()
    return out


def test_writes_in_order_at_offsets_and_syncs(io, impl, tmp_path):
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        io.submit(fd, [b"hello ", memoryview(b"xxworld")[2:]], 0, impl.DATASYNC)
        io.submit(fd, [bytearray(b"!\n")], 11, impl.NO_SYNC)
        io.submit(fd, [], 0, impl.FULLSYNC)  # a sync alone
        assert wait(io, 3) == [(11, 0), (2, 0), (0, 0)]
        assert io.results() == []
        assert os.pread(fd, 100, 0) == b"hello world!\n"
    finally:
        os.close(fd)


def test_more_buffers_than_one_pwritev_takes(io, impl, tmp_path):
    """Past IOV_MAX (1024 on Linux) the request is written in several pwritev calls."""
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        bufs = [b"%05d," % i for i in range(3000)] + [b""]
        io.submit(fd, bufs, 7, impl.DATASYNC)
        assert wait(io, 1) == [(6 * 3000, 0)]
        assert os.pread(fd, 7 + 6 * 3000, 0) == b"\0" * 7 + b"".join(bufs)
    finally:
        os.close(fd)


def test_directory_fsync(io, impl, tmp_path):
    dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        io.submit(dfd, [], 0, impl.FULLSYNC)
        assert wait(io, 1) == [(0, 0)]
    finally:
        os.close(dfd)


def test_kernel_errors_come_back_as_errno(io, impl, tmp_path):
    path = tmp_path / "ro"
    path.write_bytes(b"")
    ro = os.open(path, os.O_RDONLY)
    r, w = os.pipe()
    try:
        io.submit(ro, [b"data"], 0, impl.DATASYNC)  # write to a read-only descriptor
        io.submit(r, [], 0, impl.DATASYNC)  # fdatasync of a pipe
        io.submit(ro, [], 0, impl.NO_SYNC)  # nothing to do: fine
        (w1, e1), (_, e2), ok = wait(io, 3)
        assert (w1, e1) == (0, errno.EBADF)
        assert e2 == errno.EINVAL
        assert ok == (0, 0)
    finally:
        for fd in (ro, r, w):
            os.close(fd)


def test_stop_lets_queued_requests_finish(impl, tmp_path):
    t = impl.IoThread()
    t.start()
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        for i in range(20):
            t.submit(fd, [b"%02d" % i], 2 * i, impl.DATASYNC)
        t.stop()
        t.join(10)
        assert os.pread(fd, 100, 0) == b"".join(b"%02d" % i for i in range(20))
    finally:
        os.close(fd)


def test_compiled_thread_never_waits_for_the_gil(tmp_path):
    """While this thread holds the GIL (a busy event loop, switch interval far away), the
    compiled I/O thread still writes, syncs and reports; the twin cannot even dequeue."""
    if "c" not in IMPLS:
        pytest.skip("the compiled I/O thread is not built")
    t = IMPLS["c"].IoThread()
    t.start()
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    old = sys.getswitchinterval()
    sys.setswitchinterval(30.0)
    try:
        time.sleep(0.05)  # the thread is now blocked in read(2), without the GIL
        t.submit(fd, [b"x" * 4096], 0, IMPLS["c"].DATASYNC)
        end = time.monotonic() + 1.0
        ready: list = []
        while not ready and time.monotonic() < end:  # pure Python: never releases the GIL
            ready = select.select([t.done_fd], [], [], 0)[0]
        assert ready, "the compiled I/O thread needed the GIL"
        assert t.results() == [(4096, 0)]
    finally:
        sys.setswitchinterval(old)
        t.stop()
        t.join(5)
        os.close(fd)
