"""`fastmta serve`: a supervisor process and N worker processes.

Each worker owns one event loop, one spool shard (``<spool>/shard-<i>``), its own delivery
engine, and its own listening socket on every configured address (SO_REUSEPORT: the kernel
spreads connections over the workers). The supervisor makes those sockets and keeps them, as
Postfix's master does: a worker that is restarted, or replaced on SIGHUP (new config), hands
its socket on to its successor, and connections that arrive meanwhile wait in its backlog
instead of being refused. On SIGTERM/SIGINT it stops them all cleanly (in-flight
transactions finish, then exit).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable

from . import __version__, build_kind, loop
from .anvil import ConnectionCounts
from .config import Config, ConfigError, parse_hostport
from .dkim import Signers
from .log import DeliveryLog, ReceptionRecord, setup_logging
from .spool import Spool, SpoolError
from .spool.records import StoredMessage

log = logging.getLogger("fastmta")

ADOPT_INTERVAL = 1.0  # seconds between looks into <spool>/incoming (fastmta send)
STOP_TIMEOUT = 30.0  # seconds a stopping worker gives in-flight transactions
CRASH_WINDOW = 5.0  # a worker dying this soon after start is a start-up failure
# A Python thread that needs the GIL while the loop is busy waits up to the switch interval
# (CPython's default 5 ms) each time. The compiled spool I/O thread never needs it; the
# pure-Python twin's does, twice per group commit, as do the executor threads (Maildir
# delivery). Measured with the twin's Python writer thread (smtp-source, 20 sessions, 1 KiB,
# 1 worker, delivery held): 0.005 -> ~3,400 msg/s, 0.0002 -> ~4,200 msg/s; with the spool's
# commit_delay, end to end: 0.005 -> ~2,900, 0.001 -> ~3,300, 0.0002 -> ~3,200.
SWITCH_INTERVAL = 0.001


def shard_dir(spool_root: str, index: int) -> str:
    return os.path.join(spool_root, f"shard-{index}")


def incoming_dir(spool_root: str) -> str:
    return os.path.join(spool_root, "incoming")


class Worker:
    """One worker: spool shard + delivery engine + listeners, on the running loop.
    Also what tests and embedders start in-process."""

    def __init__(
        self,
        config: Config,
        index: int = 0,
        count: int = 1,
        counts: dict[str, ConnectionCounts] | None = None,
        sockets: dict[str, list[socket.socket]] | None = None,
    ) -> None:
        self.config = config
        self.index = index
        self.count = count
        # listening sockets per listener address, made by the supervisor (listen_sockets);
        # None: bind them here (tests, embedding)
        self.sockets = sockets
        # connection counts per listener address, shared with the other workers (anvil.py);
        # None: this worker counts alone (tests, embedding)
        self.counts = counts
        root = config.server.spool_dir
        self.spool = Spool(
            shard_dir(root, index),
            incoming=incoming_dir(root),
            commit_delay=config.server.commit_delay,
        )
        self.engine = None
        self.listenings: list = []
        self.servers: list[asyncio.base_events.Server] = []
        self._stop = asyncio.Event()
        self._adopter: asyncio.Task[None] | None = None
        self._compactor: asyncio.Task[None] | None = None
        self.delivery_log: DeliveryLog | None = None
        self.control = None  # fastmta.control.ControlServer (fastmta queue ...)
        self.metrics = None  # fastmta.metrics.MetricsServer: worker 0, server.metrics_listen
        self.dkim = Signers()  # DKIM signers by domain (fastmta/dkim.py), loaded by start()

    async def start(self) -> None:
        from .control import ControlServer
        from .delivery.engine import DeliveryEngine
        from .server import Listening

        config = self.config
        try:
            self.dkim = Signers.from_config(config.dkim)
        except ValueError as e:
            raise OSError(f"DKIM: {e}") from None  # (the CLI checked: a key changed since)
        recovered = await self.spool.open(adopt=False)  # (_adopt_loop: logged as received)
        recovered += await self._absorb_orphan_shards()
        self.delivery_log = DeliveryLog(config.server.delivery_log)
        self.engine = DeliveryEngine(
            config,
            self.spool,
            delivery_log=self.delivery_log,
            hostname=config.server.hostname,
            dkim=self.dkim,
        )
        self.engine.hold = config.server.hold_delivery
        await self.engine.start(recovered)
        users = _users(config)
        local_check = _local_check(config)
        lp = asyncio.get_running_loop()
        for listener in config.listener:
            ssl_ctx = _server_ssl(config) if listener.tls in ("starttls", "implicit") else None
            ctx = Listening(
                config,
                listener,
                self.spool,
                submit=self.engine.submit,
                users=users,
                local_check=local_check,
                ssl_context=ssl_ctx,
                counts=self.counts[listener.address].worker(self.index)
                if self.counts and listener.address in self.counts
                else None,
                dkim=self.dkim,
                delivery_log=self.delivery_log,
            )
            ssl = ssl_ctx if listener.tls == "implicit" else None
            if self.sockets is not None:
                for sock in self.sockets[listener.address]:
                    self.servers.append(
                        await lp.create_server(ctx, sock=sock, backlog=LISTEN_BACKLOG, ssl=ssl)
                    )
            else:
                host, port = parse_hostport(listener.address, 25)
                self.servers.append(
                    await lp.create_server(
                        ctx, host or None, port, reuse_port=True, backlog=LISTEN_BACKLOG, ssl=ssl
                    )
                )
            self.listenings.append(ctx)
        self._adopter = asyncio.ensure_future(self._adopt_loop())
        if config.server.compact_interval > 0:
            self._compactor = asyncio.ensure_future(self._compact_loop())
        root = config.server.spool_dir
        self.control = ControlServer(root, self.index, self.count, self.engine, self.spool)
        await self.control.start()
        if self.index == 0 and config.server.metrics_listen:
            from .metrics import MetricsServer

            self.metrics = MetricsServer(parse_hostport(config.server.metrics_listen, 9125), root)
            await self.metrics.start()
        if recovered:
            log.info(
                "worker %d: recovered %d message(s) from the spool", self.index, len(recovered)
            )

    async def _adopt_loop(self) -> None:
        """Mail injected by `fastmta send` lands in <spool>/incoming; take it in (at once,
        then every ADOPT_INTERVAL)."""
        while True:
            try:
                for msg in await self.spool.adopt_incoming():
                    self.received(msg, "send")
            except (SpoolError, OSError) as e:
                log.error("adopting injected mail failed: %s", e)
            await asyncio.sleep(ADOPT_INTERVAL)

    def received(self, msg: StoredMessage, via: str) -> None:
        """A message durable in the spool, not from a listener: logged, queued."""
        if self.delivery_log is not None:
            self.delivery_log.write(ReceptionRecord.of(msg.envelope, via))
        self.engine.submit(msg)

    async def _compact_loop(self) -> None:
        """Copy the few live messages out of sparse segments so those can be deleted."""
        s = self.config.server
        while True:
            await asyncio.sleep(s.compact_interval)
            try:
                moved = await self.spool.compact(s.compact_below, s.compact_max_bytes)
            except SpoolError as e:
                log.error("spool compaction failed: %s", e)
                continue
            if moved:
                log.info("worker %d: compaction moved %d message(s)", self.index, moved)

    async def _absorb_orphan_shards(self) -> list[StoredMessage]:
        """Shards left by a run with more workers: worker i takes shard j when j % count == i,
        copies its live messages into its own shard, then removes it."""
        root = self.config.server.spool_dir
        out: list[StoredMessage] = []
        try:
            names = os.listdir(root)
        except FileNotFoundError:
            return out
        for name in sorted(names):
            if not name.startswith("shard-") or not name[6:].isdigit():
                continue
            j = int(name[6:])
            if j < self.count or j % self.count != self.index:
                continue
            orphan = Spool(os.path.join(root, name), incoming=incoming_dir(root))
            for msg in await orphan.open():
                data = orphan.read(msg)
                out.append(await self.spool.store(msg.envelope, data))
                await orphan.done(msg.envelope.id)
            await orphan.close()
            _remove_tree(os.path.join(root, name))
            log.info("worker %d: absorbed %s (%d message(s))", self.index, name, len(out))
        return out

    def request_stop(self) -> None:
        self._stop.set()

    async def wait(self) -> None:
        await self._stop.wait()

    async def stop(self) -> None:
        if self.metrics is not None:
            await self.metrics.close()
        if self.control is not None:
            await self.control.stop()
        for server in self.servers:
            server.close()
        for ctx in self.listenings:
            await ctx.drain(STOP_TIMEOUT)
        for task in (self._adopter, self._compactor):
            if task is not None:
                task.cancel()
        if self.engine is not None:
            await self.engine.stop()
        await self.spool.close()
        if self.delivery_log is not None:
            self.delivery_log.close()

    @property
    def addresses(self) -> list[tuple[str, int]]:
        out = []
        for server in self.servers:
            for sock in server.sockets:
                out.append(sock.getsockname()[:2])
        return out


def _users(config: Config):
    if not config.policy.users_file:
        return None
    from .auth import Users

    return Users(config.policy.users_file)


def _local_check(config: Config) -> Callable[[str], tuple[int, str, str] | None] | None:
    if not config.policy.local_domains:
        return None
    from .delivery.maildir import MaildirDelivery

    return MaildirDelivery.from_config(config.local).check


def _server_ssl(config: Config):
    if not config.tls.cert_file:
        return None
    from .tls import server_context

    return server_context(config.tls.cert_file, config.tls.key_file)


def _remove_tree(path: str) -> None:
    for dirpath, dirnames, filenames in os.walk(path, topdown=False):
        for f in filenames:
            os.unlink(os.path.join(dirpath, f))
        for d in dirnames:
            os.rmdir(os.path.join(dirpath, d))
    os.rmdir(path)


# ------------------------------------------------------------------ processes


_SUPERVISOR_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


def _worker_process(
    config: Config,
    index: int,
    count: int,
    counts: dict[str, ConnectionCounts] | None = None,
    sockets: dict[str, list[socket.socket]] | None = None,
) -> int:
    """Body of a worker process (after fork)."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the supervisor handles reloads
    sys.setswitchinterval(SWITCH_INTERVAL)

    async def main() -> int:
        worker = Worker(config, index, count, counts, sockets)
        lp = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            lp.add_signal_handler(sig, worker.request_stop)
        try:
            await worker.start()
        except (OSError, SpoolError) as e:
            log.error("worker %d cannot start: %s", index, e)
            return 1
        await worker.wait()
        log.info("worker %d stopping", index)
        await worker.stop()
        return 0

    return loop.run(main())


LISTEN_BACKLOG = 1024  # connections waiting to be accepted, per worker and address


def listen_sockets(address: str) -> list[socket.socket]:
    """Listening sockets for a listener address, as loop.create_server makes them (one per
    address the host resolves to, IPv6 ones v6-only), with SO_REUSEPORT so that every worker
    has its own. Raises OSError."""
    host, port = parse_hostport(address, 25)
    infos = socket.getaddrinfo(
        host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
    )
    out: list[socket.socket] = []
    try:
        for family, kind, proto, _, addr in dict.fromkeys(infos):
            s = socket.socket(family, kind, proto)
            out.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind(addr)
            s.listen(LISTEN_BACKLOG)
            s.setblocking(False)
    except OSError:
        for s in out:
            s.close()
        raise
    return out


def _check_listen(config: Config) -> str | None:
    """Bind each address once (and let go) so a taken port is a clear error at once.

    SO_REUSEADDR, not SO_REUSEPORT: with SO_REUSEPORT the bind would succeed next to another
    running server of the same user (a second `fastmta serve` on the same port), which would
    then silently get a share of the connections into its own spool. SO_REUSEADDR still
    allows TIME_WAIT leftovers of a previous run, and fails on any listening socket."""
    for listener in config.listener:
        host, port = parse_hostport(listener.address, 25)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        s = socket.socket(family, socket.SOCK_STREAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
        except OSError as e:
            why = "address already in use" if e.errno == errno.EADDRINUSE else e.strerror
            return f"cannot listen on {listener.address}: {why}"
        finally:
            s.close()
    return None


class Supervisor:
    def __init__(self, config: Config, reload: Callable[[], Config] | None) -> None:
        self.config = config
        self.reload_config = reload
        self.children: dict[int, tuple[int, float]] = {}  # pid -> (index, started)
        self.stopping = False
        self.failed = False  # a worker could not start: exit 1
        self._hup = False
        self.counts: dict[str, ConnectionCounts] = {}  # per listener address, for all workers
        self._make_counts()
        # worker index -> listener address -> its listening sockets (kept across restarts)
        self.sockets: dict[int, dict[str, list[socket.socket]]] = {}

    def _open_sockets(self, config: Config) -> None:
        """Listening sockets for every worker and listener of ``config``, keeping the ones
        already open for an address still configured. Raises OSError (nothing changed)."""
        made: list[socket.socket] = []
        new: dict[int, dict[str, list[socket.socket]]] = {}
        try:
            for i in range(config.server.workers):
                old = self.sockets.get(i, {})
                new[i] = {}
                for listener in config.listener:
                    a = listener.address
                    if a not in new[i]:
                        new[i][a] = old.get(a) or listen_sockets(a)
                        if a not in old:
                            made += new[i][a]
        except OSError:
            for s in made:
                s.close()
            raise
        gone = [
            s for i, by in self.sockets.items() for a, ss in by.items()
            if a not in new.get(i, {}) for s in ss
        ]  # fmt: skip
        self.sockets = new
        for s in gone:  # (their workers are replaced before the old sockets close: rollover)
            s.close()

    def _close_sockets(self) -> None:
        for by in self.sockets.values():
            for ss in by.values():
                for s in ss:
                    s.close()
        self.sockets = {}

    def _make_counts(self) -> None:
        """Shared connection counts for every listener of the config (before forking)."""
        for listener in self.config.listener:
            if listener.address not in self.counts:
                self.counts[listener.address] = ConnectionCounts(self.config.server.workers)

    def spawn(self, index: int) -> None:
        for counts in self.counts.values():
            counts.reset(index)  # the previous worker at this index and its connections are gone
        # The supervisor's signal handlers must never run in a worker (they would signal its
        # siblings): signals wait, blocked, until the child has its own dispositions.
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SUPERVISOR_SIGNALS)
        try:
            pid = os.fork()
        except BaseException:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            raise
        if pid == 0:  # child
            code = 1
            try:
                # until its loop takes over, a stop signal ends a worker that started nothing
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the supervisor handles reloads
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
                mine = self.sockets.get(index)
                for i, by in self.sockets.items():  # the other workers' sockets are theirs
                    if i != index:
                        for ss in by.values():
                            for sock in ss:
                                sock.close()
                code = _worker_process(
                    self.config, index, self.config.server.workers, self.counts, mine
                )
            except BaseException:  # noqa: BLE001 - a child must never return into the parent's code
                log.exception("worker %d crashed", index)
            finally:
                logging.shutdown()
                os._exit(code)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        self.children[pid] = (index, time.monotonic())

    def run(self) -> int:
        n = self.config.server.workers
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)
        try:
            try:
                self._open_sockets(self.config)
            except OSError as e:  # (serve checked each address just before)
                log.error("cannot listen: %s", e)
                return 2
            for i in range(n):
                self.spawn(i)
            self._supervise()
        finally:
            # whatever ends the loop (an exception included), no worker may outlive its
            # supervisor: orphans would go on answering SMTP with nobody to stop or reload them
            self._stop_children()
            self._close_sockets()
        return 1 if self.failed else 0

    def _supervise(self) -> None:
        """Reap workers until none is left: restart one that died, act on SIGHUP."""
        while self.children:
            if self._hup:
                self._hup = False
                self.rollover()
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                time.sleep(0.2)  # signals set flags; this loop acts on them
                continue
            index, started = self.children.pop(pid, (None, 0.0))
            if index is None or self.stopping:
                continue
            code = os.waitstatus_to_exitcode(status)
            if time.monotonic() - started < CRASH_WINDOW and code != 0:
                log.error("worker %d failed at start (exit %d); stopping", index, code)
                self._on_stop(signal.SIGTERM, None)
                self.failed = True
                continue
            log.error("worker %d died (exit %d); restarting it", index, code)
            self.spawn(index)

    def _stop_children(self) -> None:
        """SIGTERM the workers still running, wait for them (bounded), then SIGKILL."""
        if not self.children:
            return
        self._on_stop(signal.SIGTERM, None)
        deadline = time.monotonic() + STOP_TIMEOUT + 5  # they drain up to STOP_TIMEOUT
        while self.children and time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                break
            if pid == 0:
                time.sleep(0.1)
            else:
                self.children.pop(pid, None)
        for pid in list(self.children):
            log.error("worker pid %d did not stop; killing it", pid)
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            del self.children[pid]

    def _on_stop(self, signum, frame) -> None:
        self.stopping = True
        for pid in list(self.children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def _on_hup(self, signum, frame) -> None:
        self._hup = True

    def rollover(self) -> None:
        """SIGHUP: load the config again; if valid, replace the workers one at a time."""
        if self.reload_config is None:
            return
        try:
            new = self.reload_config()
        except (ConfigError, OSError) as e:
            log.error("reload failed, keeping the running configuration: %s", e)
            return
        except Exception:  # noqa: BLE001 - a reload must never take the running server down
            log.exception("reload failed, keeping the running configuration")
            return
        if new.server.workers != self.config.server.workers:
            log.warning("reload: a new worker count takes effect at the next start")
            new = _with_workers(new, self.config.server.workers)
        try:
            self._open_sockets(new)  # new addresses first: a taken one keeps the old config
        except OSError as e:
            log.error("reload failed, keeping the running configuration: cannot listen: %s", e)
            return
        self.config = new
        self._make_counts()
        log.info("reloading: replacing %d worker(s)", len(self.children))
        for pid, (index, _) in list(self.children.items()):
            os.kill(pid, signal.SIGTERM)
            os.waitpid(pid, 0)
            del self.children[pid]
            self.spawn(index)


def _with_workers(config: Config, n: int) -> Config:
    import msgspec

    return msgspec.structs.replace(config, server=msgspec.structs.replace(config.server, workers=n))


def _prepare_files(config: Config) -> str | None:
    """Open the log file, make the spool directory and open the delivery log, so a bad path is
    a clear error naming its key before any worker starts. Returns the problem, or None."""
    s = config.server
    try:
        setup_logging(s.log_level, s.log_file or None)
    except OSError as e:
        return f"config error: server.log_file: cannot open {s.log_file}: {e.strerror or e}"
    try:
        os.makedirs(s.spool_dir, exist_ok=True)
    except OSError as e:
        why = "exists and is not a directory" if isinstance(e, FileExistsError) else e.strerror
        return f"config error: server.spool_dir: cannot use {s.spool_dir}: {why or e}"
    try:
        os.makedirs(os.path.dirname(s.delivery_log), exist_ok=True)
        with open(s.delivery_log, "ab"):
            pass
    except OSError as e:
        return f"config error: server.delivery_log: cannot open {s.delivery_log}: {e.strerror or e}"
    return None


def serve(config: Config, reload: Callable[[], Config] | None = None) -> int:
    """Run the server until SIGTERM/SIGINT. Returns the process exit code."""
    problem = _prepare_files(config) or _check_listen(config)
    if problem:
        print(f"fastmta: {problem}", file=sys.stderr)
        return 2
    listens = ", ".join(f"{lst.address} ({lst.role}, tls={lst.tls})" for lst in config.listener)
    print(
        f"fastmta {__version__} ({build_kind()}, {loop.loop_name()}): "
        f"listening on {listens}\n"
        f"  spool {config.server.spool_dir}, {config.server.workers} worker(s), "
        f"delivery {'held' if config.server.hold_delivery else 'on'}, "
        f"hostname {config.server.hostname}",
        file=sys.stderr,
        flush=True,
    )
    return Supervisor(config, reload).run()
