"""The control socket: how ``fastmta queue ...`` talks to the running workers.

Each worker listens on a Unix socket ``<spool>/control/worker-<i>.sock``. The directory is
mode 0700, so only the server's user (and root) may connect: the socket is the operator's
authority over the queue, there is no other authentication.

Protocol: JSON lines (msgspec). One request per connection: the client sends one
:class:`Request` line; the worker answers with zero or more item lines and one final line
whose ``end`` is true (and whose ``error`` says why, if the request failed). Commands::

    list    [selection]   one line per message (env), then end (count)
    show    ids           one line per id found (env, headers), then end (found)
    hold    selection     end (found: the ids this worker has; count: messages changed)
    release selection     the same
    delete  selection     the same (removed without a DSN, like postsuper -d)
    bounce  selection     the same; the recipients concerned bounce with a DSN (``reason``)
    flush   [selection]   retry now: these, or every deferred message; end (found)
    suspensions           read <spool>/suspended.json again (queue/suspend.py); end
    stats                 end (stats: engine counters, "spool": live messages, "pid")

A selection is queue ids, ``all``, recipient ``domains`` and ``senders``, every criterion given
holding (fastmta/queue/select.py); hold, release, delete and bounce refuse an empty one.

A worker knows only its own shard, so the client asks every worker and merges the answers
(fastmta/queuecmd.py). The server side runs on the worker's event loop; the client side is
plain blocking sockets (the CLI has no loop).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any

import msgspec

from fastmta.queue.select import Selection, bounce_reason, check_reason
from fastmta.spool import SpoolError
from fastmta.spool.records import Envelope

if TYPE_CHECKING:
    from fastmta.delivery.engine import DeliveryEngine
    from fastmta.spool import Spool

__all__ = [
    "COMMANDS",
    "ask_async",
    "ControlError",
    "ControlServer",
    "Line",
    "NotRunning",
    "Request",
    "ask",
    "control_dir",
    "header_section",
    "socket_path",
    "worker_sockets",
]

log = logging.getLogger("fastmta.control")

COMMANDS = (
    "list", "show", "hold", "release", "delete", "bounce", "flush", "suspensions", "stats",
)  # fmt: skip
_MAX_UNIX_PATH = 107  # sun_path is 108 bytes on Linux, one of them the terminating NUL


class Request(msgspec.Struct, omit_defaults=True):
    cmd: str  # one of COMMANDS
    ids: list[str] = []
    all: bool = False  # hold/release/delete/bounce: every message of the worker
    domains: list[str] = []  # only messages with a recipient still to deliver at one of these
    senders: list[str] = []  # only messages from one of these senders ("<>": bounces)
    reason: str = ""  # bounce: the operator's reason, for the DSN

    def selection(self) -> Selection:
        return Selection(self.ids, self.all, self.domains, self.senders)


class Line(msgspec.Struct, omit_defaults=True):
    """One answer line. Item lines carry ``env``; the final line has ``end`` true."""

    end: bool = False
    error: str = ""  # on the final line: the request failed (after ``count`` changes)
    env: Envelope | None = None
    headers: str = ""  # show: the message's header section
    found: list[str] = []  # ids this worker has (requests that named ids)
    count: int = 0  # list: lines sent; hold/release/delete: messages found
    stats: dict[str, int | float | dict[str, int]] = {}
    worker: int = -1


_ENCODER = msgspec.json.Encoder()
_REQUEST_DECODER = msgspec.json.Decoder(Request)
_LINE_DECODER = msgspec.json.Decoder(Line)


def control_dir(spool_root: str) -> str:
    return os.path.join(spool_root, "control")


def socket_path(spool_root: str, index: int) -> str:
    return os.path.join(control_dir(spool_root), f"worker-{index}.sock")


def worker_sockets(spool_root: str) -> list[tuple[int, str]]:
    """(worker index, socket path) of every control socket file under ``spool_root``."""
    out = []
    try:
        names = os.listdir(control_dir(spool_root))
    except (FileNotFoundError, NotADirectoryError):
        return out
    for name in names:
        stem = name.removeprefix("worker-").removesuffix(".sock")
        if name.startswith("worker-") and name.endswith(".sock") and stem.isdigit():
            out.append((int(stem), os.path.join(control_dir(spool_root), name)))
    out.sort()
    return out


def header_section(data: bytes, limit: int = 256 << 10) -> str:
    """The header section of a wire-form message (everything before the first empty line,
    RFC 5322 2.1), at most ``limit`` bytes, dot-stuffing removed (RFC 5321 4.5.2), decoded as
    UTF-8 (RFC 6532) with U+FFFD for invalid bytes. No I/O."""
    head = data[:limit]
    if head.startswith(b"\r\n"):
        return ""
    end = head.find(b"\r\n\r\n")
    if end >= 0:
        head = head[: end + 2]
    lines = [ln[1:] if ln[:1] == b"." else ln for ln in head.split(b"\r\n")]
    return b"\r\n".join(lines).decode("utf-8", "replace").replace("\r\n", "\n")


# ------------------------------------------------------------------------------- server side


class ControlServer:
    """The control socket of worker ``index`` (of ``count``), serving ``engine`` and ``spool``.

    max_request   bytes of one request line (ids of a big ``hold`` included)
    timeout       seconds a client may take to send its request, or to take each batch
    batch         list lines per write (the loop runs other work between batches)
    """

    def __init__(
        self,
        spool_root: str,
        index: int,
        count: int,
        engine: DeliveryEngine,
        spool: Spool,
        *,
        max_request: int = 4 << 20,
        timeout: float = 30.0,
        batch: int = 1000,
    ) -> None:
        self.path = socket_path(spool_root, index)
        self.index = index
        self.count = count
        self.engine = engine
        self.spool = spool
        self.max_request = max_request
        self.timeout = timeout
        self.batch = batch
        self._server: asyncio.AbstractServer | None = None
        self._inode: int | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._commands: dict[str, Callable[[Request, asyncio.StreamWriter], Awaitable[Line]]] = {
            "list": self._list,
            "show": self._show,
            "hold": self._change,
            "release": self._change,
            "delete": self._change,
            "bounce": self._change,
            "flush": self._flush,
            "suspensions": self._suspensions,
            "stats": self._stats,
        }

    async def start(self) -> bool:
        """Listen; returns False (and logs why) if the socket cannot be made. The worker runs
        on without it: only ``fastmta queue`` is affected."""
        directory = os.path.dirname(self.path)
        if len(os.fsencode(self.path)) > _MAX_UNIX_PATH:
            log.error("control socket path too long for a Unix socket: %s", self.path)
            return False
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            os.chmod(directory, 0o700)
            self._remove_stale(directory)
            self._server = await asyncio.start_unix_server(
                self._serve, self.path, limit=self.max_request
            )
            self._inode = os.stat(self.path).st_ino
        except OSError as e:
            log.error("control socket %s: %s", self.path, e)
            return False
        return True

    def _remove_stale(self, directory: str) -> None:
        """Our own socket left by a crash, and those of workers beyond ``count`` (a run with
        more workers) that map to us as their shards do (app.Worker._absorb_orphan_shards)."""
        for j, path in worker_sockets(os.path.dirname(directory)):
            if j == self.index or (j >= self.count and j % self.count == self.index):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass

    async def stop(self) -> None:
        """Stop listening, end the answers in progress, remove the socket file."""
        if self._server is None:
            return
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=self.timeout)
        self._server = None
        try:
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            try:
                raw = await asyncio.wait_for(reader.readline(), self.timeout)
                req = _REQUEST_DECODER.decode(raw)
            except TimeoutError:
                final = Line(error=f"no request within {self.timeout:g}s")
            except ValueError as e:  # a line over max_request, or not a Request (DecodeError)
                final = Line(error=f"bad request: {e}")
            else:
                handler = self._commands.get(req.cmd)
                try:
                    if handler is None:
                        final = Line(error=f"unknown command {req.cmd!r}")
                    else:
                        final = await handler(req, writer)
                except SpoolError as e:
                    final = Line(error=f"spool: {e}")
            final.end = True
            final.worker = self.index
            writer.write(_ENCODER.encode(final) + b"\n")
            await asyncio.wait_for(writer.drain(), self.timeout)
        except (ConnectionError, TimeoutError):
            pass  # the client went away
        finally:
            writer.close()
            if task is not None:
                self._tasks.discard(task)

    async def _list(self, req: Request, writer: asyncio.StreamWriter) -> Line:
        count = 0
        chunk: list[Line] = []
        select = req.selection()
        async for env in self._envelopes():
            if not select.matches(env):
                continue
            chunk.append(Line(env=env))
            if len(chunk) >= self.batch:
                writer.write(_ENCODER.encode_lines(chunk))
                await asyncio.wait_for(writer.drain(), self.timeout)
                count += len(chunk)
                chunk = []
        writer.write(_ENCODER.encode_lines(chunk))
        return Line(count=count + len(chunk))

    async def _envelopes(self) -> AsyncIterator[Envelope]:
        """Every queued envelope: those in memory, then the parked ones file by file (memory
        stays flat), less any loaded back while we listed."""
        msgs = self.engine.messages()
        for sm in msgs:
            yield sm.envelope
        seen = {sm.envelope.id for sm in msgs}
        async for env in self.spool.parked_messages():
            if env.id not in seen:
                yield env

    async def _show(self, req: Request, writer: asyncio.StreamWriter) -> Line:
        found = []
        for qid in req.ids:
            sm = self.spool.get(qid)
            if sm is not None:
                env, data = sm.envelope, self.spool.read(sm)
            elif (parked := await self.spool.parked_message(qid)) is not None:
                env, data = parked
            else:
                continue
            line = Line(env=env, headers=header_section(data))
            writer.write(_ENCODER.encode(line) + b"\n")
            found.append(qid)
        return Line(found=found)

    async def _change(self, req: Request, writer: asyncio.StreamWriter) -> Line:
        select = req.selection()
        if select.empty:
            return Line(error=f"{req.cmd}: give queue ids, all, domains or senders")
        reason = ""
        if req.cmd == "bounce":
            if why := check_reason(req.reason):
                return Line(error=f"bounce: {why}")
            reason = bounce_reason(req.reason)
        engine = self.engine
        one = {
            "hold": engine.hold_message,
            "release": engine.release_message,
            "delete": engine.delete_message,
        }.get(req.cmd)

        async def action(qid: str) -> bool:
            if one is not None:
                return await one(qid)
            return await engine.bounce_message(qid, select, reason)

        found: list[str] = []
        for n, qid in enumerate(self._targets(select), 1):
            if await action(qid):
                found.append(qid)
            if n % self.batch == 0:
                await asyncio.sleep(0)  # let delivery run during a big --all
        found += await self._parked(req, select, found, reason)
        await self.spool.flush()  # the changes are durable when the operator is told
        return Line(found=found if select.ids else [], count=len(found))

    def _targets(self, select: Selection) -> list[str]:
        """The queue ids of ``select`` among the messages in memory (named ids as given:
        the parked ones among them are found by _parked)."""
        if select.ids and not select.filtered:
            return sorted(select.ids)
        return [sm.envelope.id for sm in self.engine.messages() if select.matches(sm.envelope)]

    async def _flush(self, req: Request, writer: asyncio.StreamWriter) -> Line:
        select = req.selection()
        if select.empty:
            self.engine.flush()
            await self.engine.change_parked("flush")
            return Line()
        found = await self.engine.flush_selected(select)
        await self.spool.flush()
        return Line(found=found if select.ids else [], count=len(found))

    async def _parked(
        self, req: Request, select: Selection, found: list[str], reason: str
    ) -> list[str]:
        """The change of ``req`` applied to the parked messages ``select`` matches."""
        if select.ids:
            rest = set(select.ids).difference(found)
            if not rest:
                return []
            return await self.engine.change_parked(req.cmd, rest, select, reason)
        return await self.engine.change_parked(req.cmd, None, select, reason)

    async def _suspensions(self, req: Request, writer: asyncio.StreamWriter) -> Line:
        self.engine.load_suspensions()
        return Line()

    async def _stats(self, req: Request, writer: asyncio.StreamWriter) -> Line:
        stats: dict[str, int | float | dict[str, int]] = msgspec.structs.asdict(self.engine.stats)
        stats["spool"] = len(self.spool)
        sp = self.spool.stats  # what recovery had to cut or skip, and failed writes
        stats["spool_truncated_bytes"] = sp.truncated_bytes
        stats["spool_damaged_bytes"] = sp.damaged_bytes
        stats["spool_write_errors"] = sp.write_errors
        stats["pid"] = os.getpid()
        return Line(stats=stats)


# ------------------------------------------------------------------------------- client side


class NotRunning(Exception):
    """No worker listens on this control socket (no file, or a stale one)."""


class ControlError(Exception):
    """The worker answered with an error, or broke the protocol."""


def ask(
    path: str, request: Request, *, timeout: float = 60.0, max_line: int = 64 << 20
) -> Iterator[Line]:
    """Send ``request`` to the worker at ``path``; yield its answer lines, the final one
    (``end`` true) included. Blocking. Raises NotRunning before anything is yielded if nobody
    listens there; ControlError for an error answer or a broken one; TimeoutError if the
    worker is silent for ``timeout`` seconds. ``max_line`` bounds one answer line."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise NotRunning(f"{path}: {e.strerror}") from None
        sock.sendall(_ENCODER.encode(request) + b"\n")
        with sock.makefile("rb") as f:
            while True:
                line = _answer_line(path, f.readline(max_line + 1))
                yield line
                if line.end:
                    return
    finally:
        sock.close()


def _answer_line(path: str, raw: bytes) -> Line:
    """One answer line, checked: whole, decodable, and not a failure."""
    if not raw.endswith(b"\n"):
        why = "answer line too long" if raw else "connection closed mid-answer"
        raise ControlError(f"{path}: {why}")
    try:
        line = _LINE_DECODER.decode(raw)
    except msgspec.DecodeError as e:
        raise ControlError(f"{path}: bad answer: {e}") from None
    if line.end and line.error:
        raise ControlError(line.error)
    return line


async def ask_async(path: str, request: Request, *, timeout: float = 5.0) -> list[Line]:
    """:func:`ask` from an event loop (the metrics endpoint asks the other workers): every
    answer line, the final one included. Raises NotRunning, ControlError or TimeoutError."""
    try:
        async with asyncio.timeout(timeout):
            try:
                reader, writer = await asyncio.open_unix_connection(path, limit=1 << 20)
            except (FileNotFoundError, ConnectionRefusedError) as e:
                raise NotRunning(f"{path}: {e.strerror}") from None
            try:
                writer.write(_ENCODER.encode(request) + b"\n")
                lines = []
                while True:
                    line = _answer_line(path, await reader.readline())
                    lines.append(line)
                    if line.end:
                        return lines
            finally:
                writer.close()
    except (ValueError, asyncio.LimitOverrunError) as e:  # an over-long line
        raise ControlError(f"{path}: {e}") from None
