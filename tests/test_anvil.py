"""Connection counts shared between worker processes (fastmta/anvil.py)."""

from __future__ import annotations

import os

import pytest

from fastmta.anvil import ConnectionCounts


def test_counts_are_shared_across_a_fork_and_reset_per_worker():
    shared = ConnectionCounts(2, buckets=64)
    mine = shared.worker(0)
    mine.opened("192.0.2.1")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the other worker: counts in its own row, sees the sum
        try:
            other = shared.worker(1)
            ok = other.total() == 1 and other.of("192.0.2.1") == 1
            other.opened("192.0.2.1")
            other.opened("192.0.2.1")
            other.opened("198.51.100.7")
            os.write(w, b"1" if ok else b"0")
        finally:
            os._exit(0)
    assert os.read(r, 1) == b"1"
    os.waitpid(pid, 0)
    assert mine.total() == 4
    assert mine.of("192.0.2.1") == 3
    mine.closed("192.0.2.1")
    assert (mine.total(), mine.of("192.0.2.1")) == (3, 2)
    shared.reset(1)  # worker 1 died: its connections are gone
    assert (mine.total(), mine.of("192.0.2.1"), mine.of("198.51.100.7")) == (0, 0, 0)


def test_worker_index_out_of_range():
    with pytest.raises(ValueError):
        ConnectionCounts(2).worker(2)
