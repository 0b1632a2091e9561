"""``fastmta queue ACTION``: look at and manage the queue (Postfix postqueue/postsuper, kcli).

    list [--json] [FILTER]   one line per queued message, then "-- N messages, SIZE, H held"
    summary [--top N]        recipients to deliver per domain and age (Postfix's qshape)
    show ID...               envelope and header section
    hold SELECTION           stop delivering (recorded in the spool: survives a restart)
    release SELECTION        deliver again, now
    delete SELECTION         remove without a bounce (postsuper -d)
    bounce SELECTION         bounce the recipients still to deliver, with a DSN (kcli bounce)
    flush [SELECTION]        retry now (every deferred message if nothing is selected)
    suspend [--domain D...]  no delivery to D until resumed (or --for a while); no D: the list
    resume --domain D...     deliver to D again, its queued mail at once (or --all domains)
    stats [--json]           delivery counters per worker

SELECTION: queue ids (``-`` reads them from stdin: the first word of each line, so the
output of ``queue list`` can be piped in), ``--all``, or FILTERs: ``--domain D`` (a
recipient still to deliver at D), ``--sender S``; every criterion given must hold
(fastmta/queue/select.py).

With the server running, every action asks the workers over their control sockets
(fastmta/control.py). With it stopped, ``list`` and ``show`` read the spool directly, read
only: segment files are scanned as recovery does (fastmta/spool/segment.py), but no shard lock
is taken, no torn tail cut off, nothing written. hold, release, delete and flush then open
each shard as a worker would (taking its lock, taking in mail injected into incoming/), record
the change and close it again, like Postfix's postsuper on a stopped queue. ``stats`` needs
the server.

Exit status: 0 ok; 1 some queue ids not found (or a worker did not answer); 2 usage or
configuration error; 69 (EX_UNAVAILABLE, sysexits.h) the server is not running.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import os
import re
import sys
import time
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import msgspec

from fastmta.config import ConfigError, load_config, parse_duration
from fastmta.control import (
    ControlError,
    Line,
    NotRunning,
    Request,
    ask,
    control_dir,
    header_section,
    worker_sockets,
)
from fastmta.queue import suspend
from fastmta.queue.scheduler import domain_of
from fastmta.queue.select import Selection, bounce_reason, check_reason, command_change
from fastmta.spool import Spool, SpoolError
from fastmta.spool.inject import ADOPTING, INCOMING, SUFFIX
from fastmta.spool.parked import PARKED, envelopes, list_parked, unsettled
from fastmta.spool.records import (
    ENVELOPE_DECODER,
    Envelope,
    RcptState,
)
from fastmta.spool.recover import recover
from fastmta.spool.segment import (
    HEADER_SIZE,
    RecordType,
    scan,
    segment_name,
    split_message,
)

__all__ = ["Found", "main", "read_spool"]

EX_OK, EX_NOT_FOUND, EX_USAGE, EX_UNAVAILABLE = 0, 1, 2, 69
PROGRESS_EVERY = 10_000  # messages between progress lines on stderr (big queues)
LIST_TIMEOUT = 60.0  # seconds a worker may stay silent while it answers
CHANGE_TIMEOUT = 600.0  # hold/release/delete --all of a million messages take a while
HEADER_LIMIT = 256 << 10  # bytes of a message read by `show` to find its header section

_STATES = {int(s): s.name.lower() for s in RcptState}
_FINAL = (int(RcptState.DELIVERED), int(RcptState.BOUNCED))
_CHANGING = ("hold", "release", "delete", "bounce")


def _err(msg: str) -> None:
    print(f"fastmta: {msg}", file=sys.stderr, flush=True)


def main(args: argparse.Namespace) -> int:
    """Run ``fastmta queue <args.queue_command>``; returns the exit status."""
    try:
        overrides = {"server": {"spool_dir": args.spool}} if args.spool else None
        config = load_config(args.config, overrides)
    except FileNotFoundError:
        _err(f"config file not found: {args.config}")
        return EX_USAGE
    except (ConfigError, IsADirectoryError) as e:
        _err(str(e))
        return EX_USAGE
    root = config.server.spool_dir
    action = args.queue_command
    if problem := _check_selection(args):
        _err(f"queue {action}: {problem}")
        return EX_USAGE
    if action in ("list", "summary", "show") and not os.path.isdir(root):
        _err(f"queue {action}: no spool at {root} (check --spool or server.spool_dir)")
        return EX_USAGE
    try:
        return _ACTIONS[action](args, root)
    except BrokenPipeError:  # `fastmta queue list | head`
        sys.stderr.close()
        return EX_OK


def _check_selection(args: argparse.Namespace) -> str | None:
    """Read ``-`` ids from stdin into args.ids; why the selection is not usable (or None)."""
    ids = getattr(args, "ids", None)
    if ids is not None and "-" in ids:
        if ids != ["-"]:
            return "'-' (queue ids from stdin) goes alone"
        args.ids = _ids_from(sys.stdin)
        if not args.ids:
            return "no queue ids on stdin"
    action = args.queue_command
    every = getattr(args, "all", False)
    filtered = bool(getattr(args, "domain", None) or getattr(args, "sender", None))
    if action in _CHANGING:
        if every and (args.ids or filtered):
            return "--all selects every message: leave out queue ids, --domain and --sender"
        if not (every or args.ids or filtered):
            return "give queue ids, --all, --domain or --sender"
    if action in ("bounce", "suspend") and (why := check_reason(args.reason)):
        return f"--reason: {why}"
    if action == "resume" and bool(args.domain) == bool(args.all):
        return "give --domain (repeatable) or --all"
    for d in getattr(args, "domain", ()):
        if not _DOMAIN.fullmatch(d.strip().rstrip(".")):
            return f"--domain {d!r} is not a domain name (like example.com)"
    return None


_DOMAIN = re.compile(r"(?![-.])[\w.-]{1,253}(?<![-.])")  # (UTF-8 domains too: RFC 6531)


def _ids_from(lines: Iterator[str]) -> list[str]:
    """Queue ids, one per line (the first word: ``queue list`` output pipes in as it is)."""
    out = []
    for line in lines:
        words = line.split()
        if words and not words[0].startswith("--"):
            out.append(words[0])
    return out


def _selection(args: argparse.Namespace) -> Selection:
    return Selection(
        getattr(args, "ids", ()),
        getattr(args, "all", False),
        getattr(args, "domain", ()),
        getattr(args, "sender", ()),
    )


# ------------------------------------------------------------------------- reading the spool


class Found(NamedTuple):
    """A message found in the spool files: its envelope and where its wire bytes are."""

    env: Envelope
    path: str
    offset: int
    length: int


def _replay(directory: str) -> dict[str, Found]:
    """The live messages of one shard, read only (recover() with nothing changed on disk)."""
    return {
        qid: Found(
            sm.envelope, os.path.join(directory, segment_name(sm.segment)), sm.offset, sm.length
        )
        for qid, sm in recover(directory, readonly=True).messages.items()
    }


def _injected(directory: str) -> dict[str, Found]:
    """Messages in ``incoming/`` or ``adopting/`` files (one MESSAGE record each)."""
    out: dict[str, Found] = {}
    try:
        names = sorted(os.listdir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return out
    for name in names:
        if name.startswith(".") or not name.endswith(SUFFIX):
            continue
        path = os.path.join(directory, name)
        try:
            with open(path, "rb") as f:
                buf = f.read()
            records, _ = scan(buf)
            if len(records) != 1 or records[0][1] != RecordType.MESSAGE:
                continue
            env_bytes, at = split_message(records[0][2])
            env = ENVELOPE_DECODER.decode(env_bytes)
        except (FileNotFoundError, ValueError):  # adopted meanwhile, or damaged
            continue
        out[env.id] = Found(env, path, HEADER_SIZE + at, len(records[0][2]) - at)
    return out


def _shards(root: str) -> list[str]:
    names = [n for n in os.listdir(root) if n.startswith("shard-") and n[6:].isdigit()]
    return [os.path.join(root, n) for n in sorted(names, key=lambda n: int(n[6:]))]


def _parked(shard: str, seen: dict[str, Found]) -> Iterator[Found]:
    """The parked messages of a shard (parked.py), one file in memory at a time; as the next
    start settles them, those of a file a crash left half parked or half loaded count only
    when they are not in the log."""
    names = [pf.name for pf in list_parked(shard, cleanup=False)] + unsettled(shard, view=True)
    for name in names:
        path = os.path.join(shard, PARKED, name)
        for env, offset, length in envelopes(shard, name):
            if env.id not in seen:
                yield Found(env, path, offset, length)


def read_spool(root: str) -> Iterator[Found]:
    """Every queued message under the spool root ``root``, read only, shard by shard (one
    shard's index in memory at a time), then injected mail not yet taken in."""
    for shard in _shards(root):
        live = _replay(shard)
        for qid, found in _injected(os.path.join(shard, ADOPTING)).items():
            live.setdefault(qid, found)  # claimed; maybe stored already (then not twice)
        yield from live.values()
        yield from _parked(shard, live)
        del live
    yield from _injected(os.path.join(root, INCOMING)).values()


def _read_headers(found: Found) -> str:
    with open(found.path, "rb") as f:
        data = os.pread(f.fileno(), min(found.length, HEADER_LIMIT), found.offset)
    return header_section(data, HEADER_LIMIT)


# ------------------------------------------------------------------------- asking the workers


class _Workers:
    """Sends one request to every worker's control socket and gathers the answers."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.sockets = worker_sockets(root)
        self.down: list[int] = []  # workers that did not answer
        self.answered = 0

    def ask(self, request: Request, timeout: float = LIST_TIMEOUT) -> Iterator[tuple[int, Line]]:
        """(worker index, line) of every answer line; records workers that are down."""
        self.down, self.answered = [], 0
        for index, path in self.sockets:
            try:
                lines = ask(path, request, timeout=timeout)
                first = next(lines)
            except NotRunning:
                self.down.append(index)
                continue
            except (ControlError, TimeoutError, OSError) as e:
                _err(f"worker {index}: {e}")
                self.down.append(index)
                continue
            self.answered += 1
            yield index, first
            try:
                for line in lines:
                    yield index, line
            except (ControlError, TimeoutError, OSError) as e:
                _err(f"worker {index}: answer cut short: {e}")
                self.down.append(index)

    def warn_down(self) -> None:
        if self.answered and self.down:
            which = ", ".join(str(i) for i in sorted(self.down))
            _err(f"worker(s) {which} did not answer: their messages are not included")

    def not_running(self, action: str) -> int:
        _err(
            f"queue {action}: the server is not running (no worker answers on "
            f"{control_dir(self.root)}); start `fastmta serve` first"
        )
        return EX_UNAVAILABLE


# ------------------------------------------------------------------------- formatting


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _size(n: float) -> str:
    for unit in ("bytes", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def _status(env: Envelope, now: float) -> str:
    if env.held:
        return "held"
    if env.next_attempt <= now:
        return "next: now"
    return f"next: {_when(env.next_attempt)}"


def format_line(env: Envelope, now: float) -> str:
    """One ``queue list`` line: id, arrival, size, status, sender -> the recipients still to
    deliver with their state and last reply (final ones counted)."""
    parts = []
    final = 0
    for r in env.recipients:
        if r.state in _FINAL:
            final += 1
            continue
        text = f"<{r.address}> {_STATES.get(r.state, str(r.state))}"
        parts.append(f"{text} ({_printable(r.last_reply)})" if r.last_reply else text)
    if final:
        parts.append(f"+{final} done")
    return (
        f"{env.id}  {_when(env.arrival)}  {env.size:>9}  {_status(env, now):<25}  "
        f"<{env.sender}> -> {', '.join(parts)}"
    )


def _as_json(env: Envelope) -> dict[str, object]:
    return {
        "id": env.id,
        "arrival": env.arrival,
        "size": env.size,
        "sender": env.sender,
        "recipients": [
            {
                "address": r.address,
                "state": _STATES.get(r.state, str(r.state)),
                "last_reply": r.last_reply,
            }
            for r in env.recipients
        ],
        "attempts": env.attempts,
        "next_attempt": env.next_attempt,
        "held": env.held,
        "message_id": env.message_id,
    }


# ------------------------------------------------------------------------- actions


def _queued(args: argparse.Namespace, root: str, workers: _Workers) -> Iterator[Envelope]:
    """The queued envelopes ``args`` selects: asked of the workers, or read from the spool
    files when none answers; then injected mail not yet taken in."""
    select = _selection(args)
    incoming = _injected(os.path.join(root, INCOMING))  # not yet taken in by a worker
    request = Request("list", domains=args.domain, senders=args.sender)
    source: Iterator[Envelope] = (
        line.env for _, line in workers.ask(request) if line.env is not None
    )
    first = next(source, None)
    if first is not None or workers.answered:
        source = _chain(first, source)
    else:  # nobody answers: read the spool files
        source = (found.env for found in read_spool(root))
        incoming = {}  # read_spool includes them
    for env in _chain_incoming(source, incoming):
        if select.matches(env):  # (the workers filtered theirs; not the spool files)
            yield env


def cmd_list(args: argparse.Namespace, root: str) -> int:
    workers = _Workers(root)
    out = sys.stdout
    encode = msgspec.json.encode
    now = time.time()
    count = size = held = 0
    for env in _queued(args, root, workers):
        out.write((encode(_as_json(env)).decode() if args.json else format_line(env, now)) + "\n")
        count += 1
        size += env.size
        held += env.held
        if count % PROGRESS_EVERY == 0:
            out.flush()
            _err(f"queue list: {count} messages so far")
    workers.warn_down()
    out.flush()
    word = "message" if count == 1 else "messages"
    summary = f"-- {count} {word}, {_size(size)}, {held} held"
    print(summary, file=sys.stderr if args.json else sys.stdout)
    return EX_OK


# Age buckets in minutes, Postfix qshape's: a message counts in the first it is not older than.
AGES = (5, 10, 20, 40, 80, 160, 320, 640, 1280)
_TO_DELIVER = (int(RcptState.PENDING), int(RcptState.DEFERRED), int(RcptState.CANCELLED))


def cmd_summary(args: argparse.Namespace, root: str) -> int:
    """Recipients still to deliver per domain and age (Postfix's qshape, kcli queue-summary)."""
    workers = _Workers(root)
    now = time.time()
    rows: dict[str, list[int]] = {}  # domain -> [held, per age bucket..., older]
    messages = 0
    for env in _queued(args, root, workers):
        messages += 1
        column = 1 + bisect.bisect_left(AGES, (now - env.arrival) / 60)
        for r in env.recipients:
            if r.state in _TO_DELIVER:
                row = rows.setdefault(domain_of(r.address), [0] * (len(AGES) + 2))
                row[0 if env.held else column] += 1
        if messages % PROGRESS_EVERY == 0:
            _err(f"queue summary: {messages} messages so far")
    workers.warn_down()
    ranked = sorted(rows.items(), key=lambda kv: (-sum(kv[1]), kv[0]))
    if args.top:
        ranked = ranked[: args.top]
    if args.json:
        for domain, row in ranked:
            ages = {f"{a}m": n for a, n in zip(AGES, row[1:], strict=False)}
            ages[f"{AGES[-1]}m+"] = row[-1]
            doc = {"domain": domain, "total": sum(row), "held": row[0], "ages": ages}
            print(msgspec.json.encode(doc).decode())
        return EX_OK
    header = ["domain", "total", "held", *map(str, AGES), f"{AGES[-1]}+"]
    total = ["TOTAL", *map(str, _column_sums(rows.values(), len(AGES) + 2))]
    table = [total] + [[d, str(sum(row)), *map(str, row)] for d, row in ranked]
    widths = [max(len(r[k]) for r in (header, *table)) for k in range(len(header))]
    for r in (header, *table):
        print(r[0].ljust(widths[0]) + "  " + "  ".join(
            c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)
        ))  # fmt: skip
    print(f"-- {len(rows)} domain{'' if len(rows) == 1 else 's'}, {messages} messages; "
          "ages in minutes since arrival")  # fmt: skip
    return EX_OK


def _column_sums(rows: Iterable[list[int]], width: int) -> list[int]:
    sums = [0] * width
    for row in rows:
        for k, n in enumerate(row):
            sums[k] += n
    return [sum(sums), *sums]


def _chain(first: Envelope | None, rest: Iterator[Envelope]) -> Iterator[Envelope]:
    if first is not None:
        yield first
    yield from rest


def _chain_incoming(source: Iterator[Envelope], incoming: dict[str, Found]) -> Iterator[Envelope]:
    """``source``, then the injected messages it did not include (taken in meanwhile)."""
    for env in source:
        incoming.pop(env.id, None)
        yield env
    for found in incoming.values():
        yield found.env


def cmd_show(args: argparse.Namespace, root: str) -> int:
    wanted = list(dict.fromkeys(args.ids))
    shown: dict[str, tuple[Envelope, str]] = {}
    workers = _Workers(root)
    for _, line in workers.ask(Request("show", ids=wanted)):
        if line.env is not None:
            shown[line.env.id] = (line.env, line.headers)
    missing = [qid for qid in wanted if qid not in shown]
    if missing:  # the server is stopped, or the message is still in incoming/
        source = read_spool(root) if not workers.answered else _incoming_only(root)
        for found in source:
            if found.env.id in missing:
                shown[found.env.id] = (found.env, _read_headers(found))
    first = True
    for qid in wanted:
        if qid in shown:
            if not first:
                print()
            first = False
            env, headers = shown[qid]
            sys.stdout.write(_describe(env) + "\n" + headers)
    workers.warn_down()
    for qid in wanted:
        if qid not in shown:
            _err(f"queue show: {qid}: no such message")
    return EX_OK if len(shown) == len(wanted) else EX_NOT_FOUND


def _incoming_only(root: str) -> Iterator[Found]:
    yield from _injected(os.path.join(root, INCOMING)).values()
    for shard in _shards(root):
        yield from _injected(os.path.join(shard, ADOPTING)).values()


def _describe(env: Envelope) -> str:
    rows = [
        ("queue id", env.id),
        ("arrival", f"{_when(env.arrival)} ({env.arrival:.3f})"),
        ("size", f"{env.size} bytes"),
        ("sender", f"<{env.sender}>"),
    ]
    for r in env.recipients:
        state = _STATES.get(r.state, str(r.state))
        reply = f": {_printable(r.last_reply)}" if r.last_reply else ""
        rows.append(("recipient", f"<{r.address}> {state}{reply}"))
    rows.append(("attempts", str(env.attempts)))
    rows.append(("next attempt", _when(env.next_attempt) if env.next_attempt else "now"))
    rows.append(("held", "yes" if env.held else "no"))
    for key, value in (
        ("message-id", env.message_id),
        ("client", env.client),
        ("auth", env.auth),
        ("body", env.body),
        ("smtputf8", "yes" if env.smtputf8 else None),
        ("ret", env.ret),
        ("envid", env.envid),
        ("bounce", "yes (a DSN)" if env.is_bounce else None),
        ("delay dsn", "sent" if env.warned else None),
    ):
        if value:
            rows.append((key, _printable(value)))
    return "".join(f"{key + ':':<14}{value}\n" for key, value in rows)


def _printable(text: str) -> str:
    """Remote text (a reply, a HELO name, a Message-ID) for a terminal: control characters
    (an escape sequence could rewrite the screen) shown as "?"."""
    return text if text.isprintable() else "".join(c if c.isprintable() else "?" for c in text)


def cmd_change(args: argparse.Namespace, root: str) -> int:
    """hold, release, delete, bounce: by a selection; flush: by one, or everything."""
    action = args.queue_command
    request = Request(
        action,
        ids=list(dict.fromkeys(args.ids)),
        all=getattr(args, "all", False),
        domains=args.domain,
        senders=args.sender,
        reason=getattr(args, "reason", ""),
    )
    workers = _Workers(root)
    found: set[str] = set()
    count = 0
    failed = False
    timeout = CHANGE_TIMEOUT if request.all or len(request.ids) > 1000 else LIST_TIMEOUT
    for _, line in workers.ask(request, timeout):
        if line.end:
            found.update(line.found)
            count += line.count
    stopped = not workers.answered
    if stopped:
        try:
            count, found = asyncio.run(_change_stopped(request, root))
        except SpoolError as e:  # a shard is locked: a server runs but does not answer
            _err(f"queue {action}: {e}; is the server starting or stopping? try again")
            return EX_UNAVAILABLE
        workers.down = []  # sockets left by a stopped server, not workers that failed
    if workers.down:
        failed = True
        which = ", ".join(str(i) for i in sorted(workers.down))
        _err(f"queue {action}: worker(s) {which} did not answer; their messages are unchanged")
    done = {
        "hold": "held",
        "release": "released",
        "delete": "deleted",
        "bounce": "bounced",
        "flush": "flushed",
    }
    if action == "flush" and request.selection().empty:
        if stopped:
            print(f"flush: {count} message{'' if count == 1 else 's'} due when the server starts")
        else:
            print(f"flush: {workers.answered} worker(s) retry every deferred message now")
        return EX_NOT_FOUND if failed else EX_OK
    print(f"{done[action]}: {count} message{'' if count == 1 else 's'}")
    narrowed = " selected by --domain/--sender" if request.domains or request.senders else ""
    for qid in request.ids:
        if qid not in found:
            _err(f"queue {action}: {qid}: no such message{narrowed}")
            failed = True
    return EX_NOT_FOUND if failed else EX_OK


async def _change_stopped(request: Request, root: str) -> tuple[int, set[str]]:
    """hold/release/delete/flush with the server stopped: each shard is opened as a worker
    opens it (its lock taken, injected mail taken in), changed, and closed. Returns (messages
    changed, queue ids found). Raises SpoolError if a shard is locked by a running server."""
    from fastmta.app import shard_dir  # noqa: PLC0415 - the server's modules, only here

    incoming = os.path.join(root, INCOMING)
    shards = _shards(root) if os.path.isdir(root) else []
    if not shards and os.path.isdir(incoming):
        shards = [shard_dir(root, 0)]  # injected mail only: the first worker's shard takes it
    select = request.selection()
    reason = bounce_reason(request.reason) if request.cmd == "bounce" else ""
    change = command_change(request.cmd, select, reason)
    count, found = 0, set()
    for shard in shards:
        spool = Spool(shard, incoming=incoming)
        messages = await spool.open()
        try:
            while adopted := await spool.adopt_incoming():
                messages += adopted
            for sm in messages:
                env = sm.envelope
                outcome = change(env)
                if outcome is False:
                    continue
                found.add(env.id)
                count += 1
                if outcome is None:
                    await spool.done(env.id)
                else:
                    await spool.update(env)
            rest = set(select.ids) - found if select.ids else None
            if rest is None or rest:
                touched = await spool.change_parked(change, rest)
                found.update(touched)
                count += len(touched)
        finally:
            await spool.close()
        if len(shards) > 1 or count >= PROGRESS_EVERY:
            print(f"  {os.path.basename(shard)}: done ({count:,} so far)", file=sys.stderr)
    return count, found


def cmd_suspend(args: argparse.Namespace, root: str) -> int:
    """Add suspended domains (or, with none given, print the list)."""
    try:
        current = suspend.load(root)
    except ValueError as e:
        _err(f"queue suspend: {e}")
        return EX_USAGE
    if not args.domain:
        for s in sorted(current.values(), key=lambda s: s.domain):
            until = f"until {_when(s.until)}" if s.until else "until resumed"
            why = f"  ({s.reason})" if s.reason else ""
            print(f"{s.domain}  since {_when(s.since)}  {until}{why}")
        print(f"-- {len(current)} suspended domain{'' if len(current) == 1 else 's'}")
        return EX_OK
    now = time.time()
    try:
        seconds = parse_duration(args.duration) if args.duration else 0.0
        if args.duration and seconds <= 0:
            raise ValueError(
                f"must be more than 0 (leave --for out: until resumed), got {seconds:g}s"
            )
    except ValueError as e:
        _err(f"queue suspend: --for: {e}")
        return EX_USAGE
    for d in args.domain:
        domain = d.strip().rstrip(".").lower()
        current[domain] = suspend.Suspension(
            domain, now, now + seconds if seconds else 0.0, args.reason.strip()
        )
        until = f"until {_when(now + seconds)}" if seconds else "until resumed"
        print(f"suspended: {domain} ({until})")
    return _save_suspensions(root, current, "suspend")


def cmd_resume(args: argparse.Namespace, root: str) -> int:
    """Remove suspended domains; their queued mail is due at once."""
    try:
        current = suspend.load(root)
    except ValueError as e:
        current = {}  # (a damaged file: resuming everything replaces it)
        if not args.all:
            _err(f"queue resume: {e}")
            return EX_USAGE
    domains = list(current) if args.all else [d.strip().rstrip(".").lower() for d in args.domain]
    missing = [d for d in domains if current.pop(d, None) is None]
    for d in missing:
        _err(f"queue resume: {d} was not suspended")
    status = _save_suspensions(root, current, "resume")
    if status != EX_OK or not domains:
        if not domains:
            print("resumed: no domain was suspended")
        return status
    flush = Request("flush", domains=domains)
    workers = _Workers(root)
    for _ in workers.ask(flush):
        pass
    if not workers.answered and os.path.isdir(root):
        try:
            asyncio.run(_change_stopped(flush, root))
        except SpoolError as e:
            _err(f"queue resume: {e}; its mail waits for its next retry")
    print(f"resumed: {', '.join(domains)}; queued mail for them is due now")
    return EX_NOT_FOUND if missing else EX_OK


def _save_suspensions(root: str, current: dict[str, suspend.Suspension], action: str) -> int:
    """Write the list; tell the running workers to read it again."""
    try:
        suspend.save(root, current)
    except OSError as e:
        _err(f"queue {action}: cannot write {suspend.path(root)}: {e}")
        return EX_USAGE
    workers = _Workers(root)
    for _ in workers.ask(Request("suspensions")):
        pass
    if not workers.answered:
        print("(the server is not running: it reads the list when it starts)")
    workers.warn_down()
    return EX_NOT_FOUND if workers.answered and workers.down else EX_OK


_STAT_COLUMNS = (
    "spool", "queued", "held", "parked", "in_memory", "delivered", "deferred", "bounced",
    "attempts", "dsns", "connections_opened", "reused", "chained",
)  # fmt: skip


def cmd_stats(args: argparse.Namespace, root: str) -> int:
    workers = _Workers(root)
    rows: list[tuple[int, dict[str, int | float | dict[str, int]]]] = []
    for index, line in workers.ask(Request("stats")):
        if line.end:
            rows.append((index, line.stats))
    if not workers.answered:
        return workers.not_running("stats")
    if args.json:
        for index, stats in rows:
            print(msgspec.json.encode({"worker": index, **stats}).decode())
    else:
        header = ["worker", "pid", *_STAT_COLUMNS]
        table = [[str(i), str(int(s.get("pid", 0))), *(_num(s.get(c, 0)) for c in _STAT_COLUMNS)]
                 for i, s in rows]  # fmt: skip
        total = ["total", "", *(_num(sum(s.get(c, 0) for _, s in rows)) for c in _STAT_COLUMNS)]
        widths = [max(len(r[k]) for r in (header, *table, total)) for k in range(len(header))]
        for r in (header, *table, total):
            print("  ".join(cell.rjust(w) for cell, w in zip(r, widths, strict=True)))
        failures: dict[str, int] = {}
        for _, s in rows:
            for cls, n in (s.get("failures") or {}).items():  # type: ignore[union-attr]
                failures[cls] = failures.get(cls, 0) + n
        if failures:
            ranked = sorted(failures.items(), key=lambda kv: (-kv[1], kv[0]))
            print("failed attempts by class: " + ", ".join(f"{c} {n}" for c, n in ranked))
        damaged = sum(s.get("spool_damaged_bytes", 0) for _, s in rows)
        if damaged:
            print(f"spool: {damaged} damaged bytes skipped at recovery (see the log)")
    workers.warn_down()
    return EX_NOT_FOUND if workers.down else EX_OK


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:.3f}"


_ACTIONS = {
    "list": cmd_list,
    "show": cmd_show,
    "hold": cmd_change,
    "release": cmd_change,
    "delete": cmd_change,
    "bounce": cmd_change,
    "flush": cmd_change,
    "summary": cmd_summary,
    "suspend": cmd_suspend,
    "resume": cmd_resume,
    "stats": cmd_stats,
}
