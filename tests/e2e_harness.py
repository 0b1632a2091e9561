"""Shared helpers of the end-to-end tests: run ``fastmta serve`` as a real subprocess.

    srv = ServerProcess(tmp_path, {"server": {"workers": 2}})
    srv.start()                   # writes the TOML config, spawns, waits for the 220 greeting
    ...                           # talk SMTP to srv.host:srv.port (smtplib, raw sockets)
    srv.stop()                    # SIGTERM, then SIGKILL to the process group after a timeout
    srv.kill()                    # SIGKILL the supervisor and every worker (a crash)
    msgs = read_spool(srv.spool_dir)   # {queue_id: (Envelope, bytes)}, server stopped

The server runs in its own session (process group), so a crash kills the supervisor and every
worker it forked at once, and only those: processes are found by their process group id in
/proc, never by name.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from fastmta.spool import Envelope, Spool
from fastmta.spool.parked import list_parked, read_parked

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START_TIMEOUT = 15.0  # seconds for `fastmta serve` to answer 220 (2 shared cores, cold imports)
STOP_TIMEOUT = 10.0  # seconds after SIGTERM before the process group gets SIGKILL


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` where nothing listens now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------- TOML


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _toml_key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else json.dumps(k)


def to_toml(doc: dict[str, dict[str, Any] | list[dict[str, Any]]]) -> str:
    """The small TOML subset the config needs: tables of scalars/lists, arrays of tables."""
    out: list[str] = []
    for name, body in doc.items():
        tables = body if isinstance(body, list) else [body]
        header = f"[[{name}]]" if isinstance(body, list) else f"[{name}]"
        for table in tables:
            out.append(header)
            out += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items()]
            out.append("")
    return "\n".join(out)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# ---------------------------------------------------------------------------------- processes


def _state(stat_path: str) -> tuple[bytes, int] | None:
    """(state letter, process group) from a /proc stat file, None if it is gone."""
    try:
        with open(stat_path, "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # "pid (comm) state ppid pgrp ...": comm may hold spaces, so split after the last ")"
    fields = stat[stat.rfind(b")") + 2 :].split()
    return fields[0], int(fields[2])


def process_alive(pid: int) -> bool:
    """Some thread of ``pid`` has not finished exiting. A killed process's main thread turns
    zombie while its other threads (the spool writer) may still hold its files and locks."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for tid in tids:
        st = _state(f"/proc/{pid}/task/{tid}/stat")
        if st is not None and st[0] not in (b"Z", b"X"):
            return True
    return False


def _group_members(pgid: int) -> list[int]:
    """Processes of process group ``pgid`` that are still alive (see process_alive)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _state(f"/proc/{entry}/stat")
            if st is not None and st[1] == pgid and process_alive(int(entry)):
                out.append(int(entry))
    return out


def fastmta_command(*args: str) -> list[str]:
    """argv that runs the ``fastmta`` CLI from the source tree (the package is not installed)."""
    return [sys.executable, "-m", "fastmta.cli", *args]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


class ServerProcess:
    """``fastmta serve --config <tmp>/fastmta.toml`` on a free loopback port.

    ``overrides`` is merged over a base config (hostname mta.test, one worker, spool, log file
    and delivery log under ``tmp``, short client timeouts, retry every second, no delay DSN).
    The spool, the port and the config file stay the same across start()/stop() cycles.
    """

    def __init__(
        self, tmp: str | os.PathLike[str], overrides: dict | None = None, *, name: str = "mta"
    ) -> None:
        self.tmp = os.path.join(os.fspath(tmp), name)
        os.makedirs(self.tmp, exist_ok=True)
        self.host = "127.0.0.1"
        # Hold the port (bound, not listening) for this object's life: the server's start-up
        # check (SO_REUSEADDR) and its workers (SO_REUSEPORT, same user) can still bind it, but
        # another process's "bind port 0" cannot pick it while the server is stopped.
        self._reservation = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self._reservation.bind((self.host, 0))
        self.port = self._reservation.getsockname()[1]
        self.spool_dir = os.path.join(self.tmp, "spool")
        self.log_file = os.path.join(self.tmp, "fastmta.log")
        self.delivery_log = os.path.join(self.tmp, "delivery.log")
        self.maildir = os.path.join(self.tmp, "maildir")
        self.config_path = os.path.join(self.tmp, "fastmta.toml")
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.configure(overrides or {})

    def configure(self, overrides: dict) -> None:
        """(Re)write the config file: base config + ``overrides``; used at the next start()."""
        timeouts = (
            "connect_timeout", "greeting_timeout", "mail_timeout", "rcpt_timeout",
            "data_timeout", "data_block_timeout", "data_done_timeout",
        )  # fmt: skip
        base: dict[str, Any] = {
            "server": {
                "hostname": "mta.test",
                "workers": 1,
                "spool_dir": self.spool_dir,
                "log_file": self.log_file,
                "delivery_log": self.delivery_log,
            },
            "listener": [{"address": f"{self.host}:{self.port}", "role": "relay"}],
            "local": {"maildir_root": self.maildir},
            "queue": {"retry_schedule": [1], "retry_jitter": 0.0, "delay_warning": 0},
            "delivery": {**{t: 3 for t in timeouts}, "idle_timeout": 1, "tls": "none"},
        }
        self.config = _merge(base, overrides)
        with open(self.config_path, "w") as f:
            f.write(to_toml(self.config))

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT) -> ServerProcess:
        """Spawn the server in a new session and wait until it greets with 220."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.starts += 1
        out = open(os.path.join(self.tmp, f"stderr.{self.starts}"), "wb")  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(
                fastmta_command("serve", "--config", self.config_path),
                cwd=self.tmp,
                env=child_env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,  # its own process group: kill() reaches every worker
            )
        finally:
            out.close()
        self.wait_listening(timeout)
        return self

    def wait_listening(self, timeout: float = START_TIMEOUT) -> None:
        """Until a connection gets the 220 greeting; raises AssertionError (with the server's
        stderr) if the process exits or ``timeout`` passes first."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    f"fastmta serve exited ({self.proc.returncode}): {self.output()}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=1.0) as s:
                    if s.recv(512).startswith(b"220"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"fastmta serve did not listen in {timeout}s: {self.output()}")
            time.sleep(0.05)

    def worker_pids(self) -> list[int]:
        """The processes of the server's group other than the supervisor."""
        if self.proc is None:
            return []
        return [p for p in _group_members(self.proc.pid) if p != self.proc.pid]

    def wait_workers(self, count: int, timeout: float = START_TIMEOUT) -> list[int]:
        """Until ``count`` workers run (all of them have bound the port once they greet)."""
        deadline = time.monotonic() + timeout
        while len(pids := self.worker_pids()) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(pids)} of {count} workers after {timeout}s")
            time.sleep(0.02)
        return pids

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM the supervisor (it stops its workers cleanly); SIGKILL the whole group if it
        has not exited after ``timeout``. Returns the supervisor's exit code."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._reap_group(timeout)
        return proc.returncode

    def kill(self) -> None:
        """SIGKILL the supervisor and every worker at once (the process group), then wait
        until none of them is alive (so the spool shards are unlocked)."""
        proc = self.proc
        if proc is None:
            return
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(STOP_TIMEOUT)
        self._reap_group(STOP_TIMEOUT)

    def _reap_group(self, timeout: float) -> None:
        """Workers are the supervisor's children; when it died first they are re-parented and
        may outlive it for a moment. SIGKILL leftovers of our group and wait them out."""
        assert self.proc is not None
        pgid = self.proc.pid
        deadline = time.monotonic() + timeout
        while members := _group_members(pgid):
            if time.monotonic() > deadline:
                raise AssertionError(f"processes {members} of the server outlived it")
            for pid in members:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.02)

    def output(self) -> str:
        """The log file and the last run's stderr (for failure messages)."""
        parts = []
        for path in (self.log_file, os.path.join(self.tmp, f"stderr.{self.starts}")):
            try:
                with open(path, "rb") as f:
                    parts.append(f.read()[-4000:].decode("utf-8", "replace"))
            except OSError:
                pass
        return "\n".join(parts)

    # -- what it wrote --------------------------------------------------------------------------

    def delivery_records(self) -> list[dict]:
        """The delivery log's attempt lines (a torn last line, still being written, is
        skipped)."""
        return [r for r in self.log_records() if r.get("outcome") != "received"]

    def received_records(self) -> list[dict]:
        """The delivery log's reception lines: one per message taken into the queue."""
        return [r for r in self.log_records() if r.get("outcome") == "received"]

    def log_records(self) -> list[dict]:
        """Every JSON line of the delivery log."""
        try:
            with open(self.delivery_log, "rb") as f:
                lines = f.read().split(b"\n")
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def read_spool(self) -> dict[str, tuple[Envelope, bytes]]:
        """Every live message in the spool (server stopped): see :func:`read_spool`."""
        assert self.proc is None or self.proc.poll() is not None, "stop the server first"
        return read_spool(self.spool_dir)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is not None:  # shown by pytest with the failure
            sys.stderr.write(f"--- fastmta serve output ---\n{self.output()}\n")
        try:
            self.stop()
        finally:
            self._reservation.close()

    def close(self) -> None:
        """For ``finally:`` blocks: kill whatever still runs and give the port back."""
        try:
            self.kill()
        finally:
            self._reservation.close()


def read_spool(root: str) -> dict[str, tuple[Envelope, bytes]]:
    """{queue_id: (envelope, stored wire bytes)} of every live message in every shard
    ``<root>/shard-<i>``, through fastmta.spool.Spool (recovery included), parked ones included
    (a message is never both: asserted). Messages waiting in ``<root>/incoming`` are not read
    (opening a shard with the default ``incoming`` leaves them)."""

    async def main() -> dict[str, tuple[Envelope, bytes]]:
        out: dict[str, tuple[Envelope, bytes]] = {}
        if not os.path.isdir(root):
            return out
        for name in sorted(os.listdir(root)):
            if not name.startswith("shard-"):
                continue
            spool = Spool(os.path.join(root, name))
            try:
                for sm in await spool.open():
                    assert sm.envelope.id not in out, f"{sm.envelope.id} in two shards"
                    out[sm.envelope.id] = (sm.envelope, spool.read(sm))
                for pf in list_parked(spool.directory):  # parked beyond queue.max_resident
                    for env, data in read_parked(spool.directory, pf.name) or ():
                        assert env.id not in out, f"{env.id} is both parked and in the log"
                        out[env.id] = (env, data)
            finally:
                await spool.close()
        return out

    return asyncio.run(main())


# ---------------------------------------------------------------------------------- clients


def send(
    host: str, port: int, sender: str, rcpts: list[str], data: bytes, timeout: float = 10.0
) -> str:
    """One SMTP transaction with smtplib; returns the queue id from "250 ... queued as ID".
    Raises smtplib.SMTPException or OSError when the server refuses or goes away."""
    with smtplib.SMTP(host, port, local_hostname="client.test", timeout=timeout) as smtp:
        return send_on(smtp, sender, rcpts, data)


def send_on(smtp: smtplib.SMTP, sender: str, rcpts: list[str], data: bytes) -> str:
    """One transaction on an open smtplib connection; returns the queue id."""
    smtp.ehlo_or_helo_if_needed()
    code, resp = smtp.mail(sender)
    if code != 250:
        raise smtplib.SMTPSenderRefused(code, resp, sender)
    for r in rcpts:
        code, resp = smtp.rcpt(r)
        if code not in (250, 251):
            raise smtplib.SMTPRecipientsRefused({r: (code, resp)})
    code, resp = smtp.data(data)
    if code != 250:
        raise smtplib.SMTPDataError(code, resp)
    return queue_id_of(resp)


def queue_id_of(resp: bytes) -> str:
    text = resp.decode("ascii", "replace")
    marker = "queued as "
    assert marker in text, f"no queue id in {text!r}"
    return text.split(marker, 1)[1].split()[0]


def wire(content: bytes) -> bytes:
    """Wire form of CRLF ``content`` as the spool keeps it: dot-stuffed (RFC 5321 4.5.2)."""
    if content.startswith(b"."):
        content = b"." + content
    return content.replace(b"\r\n.", b"\r\n..")


def until(predicate: Callable[[], Any], timeout: float, what: str = "condition") -> Any:
    """Poll ``predicate`` every 20 ms; its first truthy value, or AssertionError after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not met in {timeout}s")
        time.sleep(0.02)


def strip_received(data: bytes) -> tuple[bytes, bytes]:
    """(our Received: field with its folded lines, the rest) of delivered content."""
    assert data.startswith(b"Received: "), data[:200]
    end = 0
    while True:
        nl = data.index(b"\r\n", end)
        end = nl + 2
        if data[end : end + 1] not in (b" ", b"\t"):
            return data[:end], data[end:]
