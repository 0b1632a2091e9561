"""`fastmta serve` as a process: workers sharing the port, a dead worker restarted, SIGHUP
rolling the workers over with the new config, SIGTERM stopping cleanly, clear start errors."""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import subprocess
import sys
import time

import pytest

from fastmta.testing.sink import unused_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except FileNotFoundError:
        return []


def wait_until(cond, timeout=10.0, step=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return False


def greeting(port: int) -> bytes:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            return s.recv(200)
    except OSError:
        return b""


@pytest.fixture
def serve(tmp_path):
    procs = []

    def start(config_text: str, *extra: str) -> tuple[subprocess.Popen, str]:
        cfg = tmp_path / "fastmta.toml"
        cfg.write_text(config_text)
        env = dict(os.environ, PYTHONPATH=ROOT)
        p = subprocess.Popen(
            [sys.executable, "-m", "fastmta.cli", "serve", "--config", str(cfg), *extra],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        procs.append(p)
        return p, str(cfg)

    yield start
    for p in procs:
        if p.poll() is None:
            for c in children(p.pid):
                try:
                    os.kill(c, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            p.kill()
            p.wait(10)


def config(port: int, tmp_path, workers: int = 2, hostname: str = "one.test") -> str:
    return f"""
[server]
hostname = "{hostname}"
workers = {workers}
spool_dir = "{tmp_path}/spool"
hold_delivery = true

[[listener]]
address = "127.0.0.1:{port}"
"""


def test_workers_restart_reload_and_stop(serve, tmp_path):
    port = unused_port()
    p, cfg = serve(config(port, tmp_path))
    assert wait_until(lambda: greeting(port).startswith(b"220 one.test"))
    assert wait_until(lambda: len(children(p.pid)) == 2)
    workers = children(p.pid)

    # a worker dies: the supervisor starts another; the port never stops answering
    time.sleep(CRASH_SAFE)
    os.kill(workers[0], signal.SIGKILL)
    assert wait_until(lambda: len(children(p.pid)) == 2 and workers[0] not in children(p.pid))
    assert greeting(port).startswith(b"220 ")

    # SIGHUP: new config, workers replaced one by one
    with open(cfg, "w") as f:
        f.write(config(port, tmp_path, hostname="two.test"))
    before = set(children(p.pid))
    p.send_signal(signal.SIGHUP)
    assert wait_until(lambda: not (set(children(p.pid)) & before) and len(children(p.pid)) == 2, 20)
    assert wait_until(lambda: greeting(port).startswith(b"220 two.test"))

    # mail in, then SIGTERM: clean exit, the message is in the spool
    with smtplib.SMTP("127.0.0.1", port) as c:
        assert c.sendmail("a@b.test", ["c@d.test"], b"Subject: x\r\n\r\nbody\r\n") == {}
    p.send_signal(signal.SIGTERM)
    assert p.wait(20) == 0
    segs = [f for d, _, fs in os.walk(tmp_path / "spool") for f in fs if f.endswith(".seg")]
    assert segs


CRASH_SAFE = 5.5  # the supervisor treats a death within 5 s of start as a start-up failure


def _hammer(port: int, seconds: float, during) -> tuple[int, int, int]:
    """Connect (and read the greeting) in a loop for ``seconds``, calling ``during()`` once
    after a little while; bounded in time and count. Returns (greeted, refused, other)."""
    greeted = refused = other = 0
    t0 = time.monotonic()
    done = False
    while time.monotonic() - t0 < seconds and greeted + refused + other < 5000:
        if not done and time.monotonic() - t0 > 0.3:
            during()
            done = True
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.settimeout(10)
                if s.recv(100).startswith(b"220 "):
                    greeted += 1
                else:
                    other += 1
                s.sendall(b"QUIT\r\n")
        except ConnectionRefusedError:
            refused += 1
        except OSError:
            other += 1
        time.sleep(0.002)
    return greeted, refused, other


@pytest.mark.parametrize("workers", [1, 2])
def test_reload_refuses_no_connection(serve, tmp_path, workers):
    """The supervisor owns the listening sockets: while a worker is replaced on SIGHUP its
    successor inherits the socket, and connections wait in its backlog instead of being
    refused (with one worker there is no other to take them)."""
    port = unused_port()
    p, cfg = serve(config(port, tmp_path, workers=workers))
    assert wait_until(lambda: greeting(port).startswith(b"220 one.test"))
    assert wait_until(lambda: len(children(p.pid)) == workers)
    with open(cfg, "w") as f:
        f.write(config(port, tmp_path, workers=workers, hostname="two.test"))
    greeted, refused, other = _hammer(port, 3.0, lambda: p.send_signal(signal.SIGHUP))
    assert (refused, other) == (0, 0) and greeted > 0
    assert wait_until(lambda: greeting(port).startswith(b"220 two.test"))


def test_reload_moves_a_listener(serve, tmp_path):
    """A listener address added on SIGHUP listens; one removed stops."""
    port, port2 = unused_port(), unused_port()
    p, cfg = serve(config(port, tmp_path, workers=2))
    assert wait_until(lambda: greeting(port).startswith(b"220 one.test"))
    with open(cfg, "w") as f:
        f.write(config(port2, tmp_path, workers=2, hostname="two.test"))
    p.send_signal(signal.SIGHUP)
    assert wait_until(lambda: greeting(port2).startswith(b"220 two.test"), 20)
    assert wait_until(lambda: greeting(port) == b"", 20)
    p.send_signal(signal.SIGTERM)
    assert p.wait(20) == 0


def test_port_in_use_is_a_clear_error(serve, tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    port = s.getsockname()[1]
    try:
        p, _ = serve(config(port, tmp_path, workers=1))
        out, err = p.communicate(timeout=20)
        assert p.returncode == 2
        assert f"cannot listen on 127.0.0.1:{port}: address already in use" in err
    finally:
        s.close()


def test_bad_config_exits_2(serve, tmp_path):
    p, _ = serve("[limits]\nmax_recipients = 10\n")
    out, err = p.communicate(timeout=20)
    assert p.returncode == 2 and "limits.max_recipients" in err


def test_connection_limits_hold_across_workers(serve, tmp_path):
    """max_connections(_per_ip) count every worker's connections (fastmta/anvil.py): with
    per-worker counting, two workers would let through up to twice the limit."""
    port = unused_port()
    p, _ = serve(
        config(port, tmp_path)
        + "\n[limits]\nmax_connections = 3\nmax_connections_per_ip = 2\ngreet_pause = 0\n"
    )
    assert wait_until(lambda: len(children(p.pid)) == 2 and greeting(port).startswith(b"220"))
    started = time.monotonic()

    def connect(src: str) -> tuple[socket.socket, bytes]:
        s = socket.create_connection(("127.0.0.1", port), timeout=3, source_address=(src, 0))
        return s, s.recv(200)

    held = []
    for _ in range(8):  # SO_REUSEPORT spreads these over both workers
        s, first = connect("127.0.0.1")
        held.append((s, first))
    answers = [first for _, first in held]
    assert sum(a.startswith(b"220 ") for a in answers) == 2, answers
    refused = b"421 4.7.0 Too many connections from your address"
    assert sum(a.startswith(refused) for a in answers) == 6, answers
    s, first = connect("127.0.0.2")
    held.append((s, first))
    assert first.startswith(b"220 ")
    s, first = connect("127.0.0.3")  # 3 open on the listener: the total limit
    held.append((s, first))
    assert first.startswith(b"421 4.7.0 Too many connections, try again later")

    # a worker dies with its connections: its replacement starts from zero, so nothing of
    # the dead worker's count stays behind
    time.sleep(max(0.0, CRASH_SAFE - (time.monotonic() - started)))
    for c in children(p.pid):
        os.kill(c, signal.SIGKILL)
    for s, _ in held:
        s.close()
    assert wait_until(lambda: len(children(p.pid)) == 2 and greeting(port).startswith(b"220"), 20)
    time.sleep(0.3)  # the greeting probes above have closed
    again = [connect("127.0.0.1") for _ in range(2)]
    assert all(first.startswith(b"220 ") for _, first in again), [f for _, f in again]
    for s, _ in again:
        s.close()
