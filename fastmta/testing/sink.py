"""A receiving SMTP server for tests and benchmarks, with faults on demand.

Built on the project's own sans-IO session (:mod:`fastmta.protocol.server`): the asyncio
protocol here only moves bytes and answers events, as ``fastmta/server.py`` does, but the
answers come from a :class:`Behaviour` instead of a spool and a policy. Every fault a delivery
test needs is a field of it: 421 or 554 at the greeting, 4xx/5xx per sender or recipient, 5xx
after the content, a disconnect in the middle of the content, a slow server, a final dot never
answered, commands pipelined after the final dot lost, a connection gone silent, no EHLO, no PIPELINING, no CHUNKING, STARTTLS. A dead first MX is a port where nothing
listens: :func:`unused_port`.

The server runs in its own thread with its own event loop (uvloop when installed), so plain
tests, ``asyncio.run`` tests and benchmarks all use it the same way::

    with Sink(behaviour=Behaviour(rcpt_reply=lambda a: reply(451, "4.2.1", "later")
                                  if a.startswith("b") else None)) as sink:
        ...  # send to sink.host, sink.port
        assert sink.wait_for(1)
        msg = sink.messages[0]  # SinkMessage: envelope and content (un-stuffed, CRLF)

From a shell, as the receiving end of a benchmark (counts only, nothing kept)::

    python -m fastmta.testing.sink --listen 127.0.0.1:2600 --expect 20000 --exit-when-done
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import shutil
import signal
import socket
import ssl
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from types import TracebackType

import msgspec

from ..loop import loop_name
from ..protocol import replies as R
from ..protocol.errors import MailFrom
from ..protocol.replies import Reply, reply
from ..protocol.server import (
    AuthEvent,
    AuthResponseEvent,
    CloseEvent,
    Event,
    MailEvent,
    MessageEvent,
    RcptEvent,
    ServerSession,
    SessionConfig,
    StartTLSEvent,
    State,
)

__all__ = ["Behaviour", "Sink", "SinkMessage", "main", "unused_port"]


def _default_loop_factory() -> asyncio.AbstractEventLoop:
    """A loop of the kind fastmta/loop.py chooses (uvloop unless FASTMTA_LOOP=asyncio)."""
    if loop_name() == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


# RFC 5321 3.1: a server that refuses service with a 554 greeting "MUST ... respond with the
# 503 reply code" to every command except QUIT.
_NO_SERVICE = reply(503, "5.5.1", "Error: no SMTP service here")
# RFC 6531 3.4 / RFC 5321 4.1.1.11: a parameter the server did not offer.
_CALLBACK_FAILED = reply(451, "4.3.0", "Error: sink callback failed")
_TLS_HANDSHAKE_TIMEOUT = 10.0  # seconds; a test peer that never handshakes is dropped


class SinkMessage(msgspec.Struct):
    """One message the sink accepted (or, inside ``data_reply``, is about to answer)."""

    sender: str  # "" for the null reverse-path
    recipients: list[str]  # accepted recipients only, in order
    data: bytes  # the content: CRLF line ends, dot-stuffing removed, no end marker
    helo: str | None  # the HELO/EHLO name (None if the client never said one)
    tls: bool  # the transaction ran under STARTTLS
    peer: str  # "ip:port" of the client
    received: float  # time.time() when the content was complete
    mail_params: MailFrom  # MAIL FROM and its parameters (SIZE, BODY, SMTPUTF8, RET, ENVID)


class Behaviour(msgspec.Struct):
    """What the sink does. The defaults are a well-behaved fast server.

    Callbacks run on the sink's thread; a callback that raises is answered 451 4.3.0 and the
    exception is kept in :attr:`Sink.errors`. A returned Reply that is positive (2xx/3xx) is
    used as the acceptance text; any other is the refusal.
    """

    greeting: Reply | None = None  # None: 220. 421 (RFC 5321 3.8): send and close.
    # Any other non-220 (554, RFC 5321 3.1): send, then 503 to everything except QUIT.
    ehlo: bool = True  # False: EHLO -> 502 (RFC 5321 4.1.4: client falls back to HELO)
    close_after_ehlo: Reply | None = None  # sent in the same write as the EHLO reply, then close
    pipelining: bool = True  # False: not offered, and a client that pipelines gets 554
    chunking: bool = True  # RFC 3030
    starttls: bool = False  # offer STARTTLS (RFC 3207); a self-signed cert if none given
    cert: str | None = None  # PEM certificate chain
    key: str | None = None  # PEM private key
    smtputf8: bool = True  # False: not offered, and MAIL FROM ... SMTPUTF8 gets 555
    dsn: bool = True  # False: DSN not offered (RFC 3461), and its parameters get 555
    size: int = 50 << 20  # SIZE limit (RFC 1870)
    mail_reply: Callable[[str], Reply | None] | None = None  # sender -> reply; None: accept
    rcpt_reply: Callable[[str], Reply | None] | None = None  # recipient -> reply; None: accept
    data_reply: Callable[[SinkMessage], Reply | None] | None = None  # None: 250 queued
    disconnect_in_data: bool = False  # close in the middle of the content, no reply
    delay: float = 0.0  # seconds before every reply (a pipelined group: once per group)
    stall_after_data: bool = False  # never answer the end of the content (timeouts)
    drop_after_dot: bool = False  # discard what a read holds after the content's final "."
    silent_after: int = 0  # > 0: after this many messages on a connection, ignore all input
    keep: bool = True  # keep messages (False: count only, for benchmarks)


def unused_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` where nothing listens now (a dead MX: connect is refused).
    Another process could take it later; on loopback in a test that is unlikely."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _unstuff(wire: bytes) -> bytes:
    """Wire form -> content: drop the first "." of every line that starts with one
    (RFC 5321 4.5.2). Wire form from the session stuffs every such line."""
    if wire.startswith(b"."):
        wire = wire[1:]
    return wire.replace(b"\r\n.", b"\r\n")


class _SinkSession(ServerSession):
    """The project's session with the few knobs a test server needs and a real one does not:
    a refusing greeting and no EHLO. Everything else is inherited (PIPELINING and SMTPUTF8
    are withheld through SessionConfig)."""

    def __init__(self, config: SessionConfig, b: Behaviour) -> None:
        g = b.greeting
        super().__init__(config, greeting=g.text if g is not None and g.code == 220 else None)
        self._greeting_reply = g if g is not None and g.code != 220 else None
        self._ehlo_ok = b.ehlo
        self._close_after_ehlo = b.close_after_ehlo
        self._refused = False

    def greet(self) -> None:
        g = self._greeting_reply
        if g is None or self.state is not State.GREETING:
            super().greet()
            return
        self.state = State.CONNECTED
        self._send(g)
        if g.code == 421:  # RFC 5321 3.8: the server closes after 421
            self._close("421 at greeting")
        else:
            self._refused = True

    def _helo(self, arg: bytes, esmtp: bool) -> Event | None:
        if esmtp and not self._ehlo_ok:
            self._send(R.NOT_IMPLEMENTED)
            return None
        ev = super()._helo(arg, esmtp)
        bye = self._close_after_ehlo
        if bye is not None:
            self._send(bye)
            self._close("closed after EHLO")
            return self._ready.pop(0)
        return ev

    def _command(self, line: bytes) -> Event | None:
        if self._refused and line.split(b" ", 1)[0].upper() != b"QUIT":
            self._error(_NO_SERVICE)
            return None
        return super()._command(line)


class _SinkProtocol(asyncio.Protocol):
    """One client connection: feed the session, answer its events from the Behaviour."""

    def __init__(self, sink: Sink, b: Behaviour, loop: asyncio.AbstractEventLoop) -> None:
        self.sink = sink
        self.b = b
        self.loop = loop
        self.session = _SinkSession(sink._config_for(b), b)
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.tls = False
        self._busy = False  # a delayed write or a TLS handshake is pending
        self._tls_task: asyncio.Task[None] | None = None
        self.messages = 0  # accepted over this connection

    # ------------------------------------------------------------------ asyncio side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else ""
        self.sink._opened(self)
        self.session.greet()
        self._pump()

    def data_received(self, data: bytes) -> None:
        if 0 < self.b.silent_after <= self.messages:
            return  # a connection that died silently (a NAT that forgot it, a hung server)
        if self.b.disconnect_in_data and self.session.state in (State.DATA, State.BDAT):
            self._close()  # content has started to arrive: hang up, no reply
            return
        if self.b.drop_after_dot and self.session.state is State.DATA:
            end = data.find(b"\r\n.\r\n")
            if end >= 0:
                data = data[: end + 5]  # a server that loses commands pipelined after the "."
        self.session.receive(data)
        self._pump()

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if self._tls_task is not None:
            self._tls_task.cancel()
        self.sink._closed(self)

    # ------------------------------------------------------------------ the pump

    def _pump(self) -> None:
        """Answer every event the buffered input yields, then write the replies at once
        (RFC 2920: a pipelined group gets its replies in one write)."""
        if self._busy:
            return  # the pending write or handshake pumps again when it is done
        s = self.session
        tls = False
        while (ev := s.next_event()) is not None:
            if isinstance(ev, StartTLSEvent):
                tls = True
                break
            if isinstance(ev, CloseEvent):
                break
            self._answer(ev)
        out = s.data_to_send()
        if not out and not tls and not s.closed:
            return
        if self.b.delay > 0:
            self._busy = True
            self.transport.pause_reading()
            self.loop.call_later(self.b.delay, self._flush, out, tls, True)
        else:
            self._flush(out, tls, False)

    def _flush(self, out: bytes, tls: bool, paused: bool) -> None:
        self._busy = False
        t = self.transport
        if t.is_closing():
            return
        if out:
            t.write(out)
        if self.session.closed:
            self._close()
            return
        if paused:
            t.resume_reading()
        if tls:
            self._busy = True
            self._tls_task = self.loop.create_task(self._start_tls())
        elif paused:
            self._pump()  # pipelined input that waited behind the delayed reply

    async def _start_tls(self) -> None:
        """RFC 3207: the 220 is on the wire; the next bytes are the client's handshake.
        ``loop.start_tls`` stops reading on the transport until the TLS layer is in place;
        the session hears nothing meanwhile (``_busy``)."""
        old = self.transport
        try:
            new = await self.loop.start_tls(
                old,
                self,
                self.sink._ssl_for(self.b),
                server_side=True,
                ssl_handshake_timeout=_TLS_HANDSHAKE_TIMEOUT,
            )
        except (TimeoutError, OSError):  # ssl.SSLError and ConnectionError are OSErrors
            old.abort()
            return
        if new is None:  # closed during the handshake
            old.abort()
            return
        self.transport = new
        self.tls = True
        self.session.tls_started()
        self._busy = False
        self._pump()

    def _close(self) -> None:
        out = self.session.data_to_send()
        if out:
            self.transport.write(out)
        self.transport.close()

    # ------------------------------------------------------------------ answers

    def _call(self, fn: Callable[..., Reply | None], arg: object) -> Reply | None:
        try:
            return fn(arg)
        except Exception as e:  # reported to the test through sink.errors
            self.sink._error(e)
            return _CALLBACK_FAILED

    def _answer(self, ev: Event) -> None:
        s = self.session
        b = self.b
        if isinstance(ev, RcptEvent):
            r = self._call(b.rcpt_reply, ev.rcpt.address) if b.rcpt_reply else None
            if r is None or r.is_positive():
                s.accept(r)
            else:
                s.reject(r)
        elif isinstance(ev, MailEvent):
            r = self._call(b.mail_reply, ev.mail.address) if b.mail_reply else None
            if r is None or r.is_positive():
                s.accept(r)
                self.sink.transactions += 1
            else:
                s.reject(r)
        elif isinstance(ev, MessageEvent):
            self._message(ev)
        elif isinstance(ev, (AuthEvent, AuthResponseEvent)):  # AUTH is never offered
            s.reject(reply(504, "5.5.4", "Unrecognized authentication type"))

    def _message(self, ev: MessageEvent) -> None:
        b = self.b
        if b.disconnect_in_data:
            self._close()  # the content arrived in one piece with its command: no reply
            return
        if b.stall_after_data:
            return  # never answered: the session waits, and so does the client
        msg = None
        if b.keep or b.data_reply is not None:
            s = self.session
            msg = SinkMessage(
                sender=ev.mail.address,
                recipients=[r.address for r in ev.rcpts],
                data=_unstuff(b"".join(ev.chunks)),
                helo=s.helo,
                tls=self.tls,
                peer=self.peer,
                received=time.time(),
                mail_params=ev.mail,
            )
        r = self._call(b.data_reply, msg) if b.data_reply is not None else None
        if r is not None and not r.is_positive():
            self.session.reject(r)
            return
        n = self.sink._add(msg if b.keep else None)
        self.messages += 1
        self.session.accept(r or reply(250, "2.0.0", f"Ok: queued as S{n}"))


class Sink:
    """A receiving SMTP server on ``host:port`` (port 0: pick a free one), see the module
    docstring. Counters and messages are safe to read from any thread; ``behaviour`` may be
    replaced at any time and applies to connections accepted after that."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        behaviour: Behaviour | None = None,
        *,
        loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.behaviour = behaviour if behaviour is not None else Behaviour()
        self.connections = 0  # connections accepted so far
        self.transactions = 0  # MAIL FROM accepted so far
        self.errors: list[BaseException] = []  # exceptions raised by Behaviour callbacks
        self.first_connection: float | None = None  # time.perf_counter() of the first one
        self._loop_factory = loop_factory or _default_loop_factory
        self._count = 0
        self._messages: list[SinkMessage] = []
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._open: set[_SinkProtocol] = set()
        self._configs: dict[tuple[bool, bool, int], SessionConfig] = {}
        self._ssl: dict[tuple[str | None, str | None], ssl.SSLContext] = {}
        self._tmpdir: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._servers: list[asyncio.AbstractServer] = []
        self._thread: threading.Thread | None = None
        self._on_message: Callable[[int], None] | None = None  # the CLI's progress hook

    # ------------------------------------------------------------------ public

    @property
    def address(self) -> str:
        """``"host:port"``; an IPv6 host is bracketed."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def count(self) -> int:
        """Messages accepted (250 after the content)."""
        return self._count

    @property
    def messages(self) -> list[SinkMessage]:
        """A snapshot of the kept messages, in the order they were accepted."""
        with self._cond:
            return list(self._messages)

    def wait_for(self, count: int, timeout: float = 10.0) -> bool:
        """Block until ``count`` messages were accepted; False if ``timeout`` passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: self._count >= count, timeout)

    def clear(self) -> None:
        """Forget kept messages and zero the counters (between phases of one test)."""
        with self._cond:
            self._messages.clear()
            self._count = 0
            self.connections = 0
            self.transactions = 0

    def start(self) -> Sink:
        """Bind and serve in a new thread; returns once the port is listening. Raises OSError
        if the address cannot be bound."""
        if self._thread is not None:
            raise RuntimeError("sink already started")
        started = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = self._loop_factory()
            self._loop = loop
            try:
                loop.run_until_complete(self._bind(loop, self.host, self.port))
            except BaseException as e:  # handed to start()
                failure.append(e)
                started.set()
                loop.close()
                return
            started.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self._teardown())
                loop.close()

        self._thread = threading.Thread(target=run, name=f"sink-{self.port}", daemon=True)
        self._thread.start()
        started.wait()
        if failure:
            self._thread.join()
            self._thread = None
            raise failure[0]
        return self

    def stop(self) -> None:
        """Close the listener and every connection (abruptly), then end the thread."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        if thread.is_alive():
            loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        self._thread = None
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def __enter__(self) -> Sink:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ loop side

    async def _bind(self, loop: asyncio.AbstractEventLoop, host: str, port: int) -> int:
        server = await loop.create_server(
            lambda: _SinkProtocol(self, self.behaviour, loop), host, port, backlog=1024
        )
        self._servers.append(server)
        bound = server.sockets[0].getsockname()[1]
        if self.port == 0 or self.port == port:
            self.port = bound
        return bound

    async def _teardown(self, grace: float = 0.0) -> None:
        """Stop listening; give open connections ``grace`` seconds to end (a benchmark's
        clients still saying QUIT), then abort the rest."""
        for server in self._servers:
            server.close()
        deadline = time.monotonic() + grace
        while self._open and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for p in list(self._open):
            if p.transport is not None:
                p.transport.abort()
        self._servers.clear()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(0)  # let connection_lost callbacks run

    def _config_for(self, b: Behaviour) -> SessionConfig:
        key = (b.chunking, b.starttls, b.size, b.pipelining, b.smtputf8, b.dsn)
        config = self._configs.get(key)
        if config is None:
            config = self._configs[key] = SessionConfig(
                hostname="sink.localhost",
                max_message_size=b.size,
                chunking=b.chunking,
                pipelining=b.pipelining,
                smtputf8=b.smtputf8,
                dsn=b.dsn,
                tls_available=b.starttls,
                auth="never",
            )
        return config

    def _ssl_for(self, b: Behaviour) -> ssl.SSLContext:
        from ..tls import server_context

        cert, key = b.cert, b.key
        ctx = self._ssl.get((cert, key))
        if ctx is None:
            if cert is None or key is None:
                from .certs import make_self_signed

                if self._tmpdir is None:
                    self._tmpdir = tempfile.mkdtemp(prefix="fastmta-sink-")
                cert, key = make_self_signed(self._tmpdir)
            ctx = self._ssl[(b.cert, b.key)] = server_context(cert, key)
        return ctx

    def _opened(self, p: _SinkProtocol) -> None:
        self._open.add(p)
        if self.first_connection is None:
            self.first_connection = time.perf_counter()
        self.connections += 1

    def _closed(self, p: _SinkProtocol) -> None:
        self._open.discard(p)

    def _add(self, msg: SinkMessage | None) -> int:
        with self._cond:
            if msg is not None:
                self._messages.append(msg)
            self._count += 1
            n = self._count
            self._cond.notify_all()
        if self._on_message is not None:
            self._on_message(n)
        return next(self._ids)

    def _error(self, e: BaseException) -> None:
        with self._cond:
            self.errors.append(e)


# ---------------------------------------------------------------------------------- CLI


def _parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> int:
    """``python -m fastmta.testing.sink``: count messages as fast as they come."""
    ap = argparse.ArgumentParser(prog="python -m fastmta.testing.sink", description=main.__doc__)
    ap.add_argument("--listen", action="append", type=_parse_listen, metavar="HOST:PORT")
    ap.add_argument("--quiet", action="store_true", help="no start-up lines")
    ap.add_argument("--progress", action="store_true", help="print the count every second")
    ap.add_argument("--expect", type=int, default=0, metavar="N", help="time the first N messages")
    ap.add_argument("--exit-when-done", action="store_true", help="exit after --expect messages")
    ap.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    args = ap.parse_args(argv)
    listens = args.listen or [("127.0.0.1", 2525)]
    loop = asyncio.new_event_loop() if args.loop == "asyncio" else _default_loop_factory()
    sink = Sink(listens[0][0], listens[0][1], Behaviour(keep=False))
    done = loop.create_future()

    def line(what: str) -> None:
        print(what, flush=True)

    def report() -> None:
        line(f"count {sink.count} connections {sink.connections}")

    def on_message(n: int) -> None:
        if args.expect and n == args.expect:
            elapsed = time.perf_counter() - (sink.first_connection or time.perf_counter())
            rate = n / elapsed if elapsed > 0 else 0.0
            line(f"done {n} messages in {elapsed:.3f} s: {rate:.0f} msg/s")
            if args.exit_when_done and not done.done():
                done.set_result(None)

    sink._on_message = on_message
    # signal handlers first: a caller may signal as soon as it reads "listening on"
    with contextlib.suppress(NotImplementedError, AttributeError):
        loop.add_signal_handler(signal.SIGUSR1, report)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda: done.done() or done.set_result(None))

    def tick() -> None:
        report()
        loop.call_later(1.0, tick)

    async def serve() -> None:
        # bind and announce from inside the running loop: uvloop drops a signal that
        # arrives while its loop is stopped between run_until_complete calls
        for host, port in listens:
            bound = await sink._bind(loop, host, port)
            if not args.quiet:
                line(f"listening on {host}:{bound}")
        if args.progress:
            loop.call_later(1.0, tick)
        await done

    try:
        loop.run_until_complete(serve())
    finally:
        report()
        loop.run_until_complete(sink._teardown(grace=2.0))
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
