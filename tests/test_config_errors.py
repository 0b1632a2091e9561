"""Configuration problems found before they hurt: a file that is not UTF-8, files a worker needs
at start (users file, TLS certificate), values that would crash or forge SMTP text, a SIGHUP
reload that must keep the running server, bad spool/log paths; and `fastmta send` input the
listener would refuse (control characters in -F, NUL, over-long lines, bad addresses)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from test_serve_process import children, config, greeting, serve, wait_until  # noqa: F401

from fastmta import app
from fastmta.app import Supervisor
from fastmta.auth import set_password
from fastmta.cli import fold_long_line, prepare_message
from fastmta.config import ConfigError, check_files, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fastmta.cli", *args],
        input=stdin,
        capture_output=True,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT),
        timeout=30,
    )


def error_of(tmp_path, text: str) -> str:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as exc:
        check_files(load_config(str(path)))
    return str(exc.value)


# --------------------------------------------------------------------------- loading, validation


def test_not_utf8_is_a_config_error(tmp_path):
    path = tmp_path / "c.toml"
    path.write_bytes(b"[server]\n# caf\xe9\n")
    with pytest.raises(ConfigError, match=r"c\.toml: not UTF-8 at byte 14"):
        load_config(str(path))


@pytest.mark.parametrize(
    "text, message",
    [
        ("[server]\nworkers = 99999999999999999999999", "server.workers: must be <= 256"),
        ("[server]\nworkers = 257", "server.workers: must be <= 256"),
        ('[server]\nhostname = "bad host\\r\\nX-Injected: 1"', "server.hostname: expected a host"),
        ('[server]\nhostname = "a b"', "server.hostname: expected a host name"),
        ('[delivery]\nhelo_name = "x\\ny"', "delivery.helo_name: expected a host name"),
        (
            '[[listener]]\nrole = "submission"\nauth = "always"',
            "policy.users_file: listener[0] (submission, auth always) needs AUTH users",
        ),
        ('[[listener]]\nauth = "always"', "policy.users_file: listener[0] (relay, auth always)"),
    ],
)
def test_values_a_worker_cannot_use(tmp_path, text, message):
    assert message in error_of(tmp_path, text)


@pytest.mark.parametrize("hostname", ["mx.example.org", "mx.example.org.", "[192.0.2.1]", "h"])
def test_good_host_names(tmp_path, hostname):
    path = tmp_path / "c.toml"
    path.write_text(f'[server]\nhostname = "{hostname}"\n')
    assert load_config(str(path)).server.hostname == hostname


def test_files_a_worker_reads(tmp_path):
    missing = tmp_path / "nope" / "users"
    assert f"policy.users_file: cannot read {missing}: No such file" in error_of(
        tmp_path, f'[policy]\nusers_file = "{missing}"'
    )
    broken = tmp_path / "users"
    broken.write_text("alice:not-a-hash\n")
    assert f"policy.users_file: {broken}:1: expected scrypt" in error_of(
        tmp_path, f'[policy]\nusers_file = "{broken}"'
    )
    pem = tmp_path / "bad.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    assert f"tls.cert_file: cannot load {pem} with key {pem}" in error_of(
        tmp_path, f'[tls]\ncert_file = "{pem}"\nkey_file = "{pem}"'
    )
    good = tmp_path / "good"
    set_password(str(good), "alice", "pw")
    path = tmp_path / "ok.toml"
    path.write_text(
        f'[policy]\nusers_file = "{good}"\n[[listener]]\nrole = "submission"\nauth = "always"\n'
    )
    check_files(load_config(str(path)))  # no error


def test_config_check_reads_the_files(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[policy]\nusers_file = "{tmp_path}/missing"\n')
    r = run("config", "--check", str(cfg))
    assert r.returncode == 2 and b"config error: policy.users_file: cannot read" in r.stderr
    assert b"Traceback" not in r.stderr
    cfg.write_bytes(b"# \xff\n")
    r = run("config", "--check", str(cfg))
    assert r.returncode == 2 and b"not UTF-8 at byte 2" in r.stderr


# --------------------------------------------------------------------------- the supervisor


def test_rollover_keeps_the_config_on_any_reload_failure():
    def reload():
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")

    running = load_config(None)
    sup = Supervisor(running, reload)
    sup.rollover()  # logged, not raised
    assert sup.config is running


def test_supervisor_never_leaves_its_workers_behind(monkeypatch):
    """Whatever ends the supervisor's loop, its workers are stopped before it returns."""
    sup = Supervisor(load_config(None), None)
    started: list[int] = []

    def spawn(index: int) -> None:
        # SIGTERM blocked across the fork: the child must not run the supervisor's handler
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        pid = os.fork()
        if pid == 0:  # a stand-in worker: dies of SIGTERM, else gives up after 20 s
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
                time.sleep(20)
            finally:
                os._exit(0)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        started.append(pid)
        sup.children[pid] = (index, time.monotonic())

    def rollover() -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(sup, "spawn", spawn)
    monkeypatch.setattr(sup, "rollover", rollover)
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    sup._hup = True
    t0 = time.monotonic()
    try:
        with pytest.raises(RuntimeError):
            sup.run()
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
    assert started and not sup.children
    assert time.monotonic() - t0 < 15
    for pid in started:
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # already reaped


def test_sighup_with_a_bad_config_keeps_serving(serve, tmp_path):  # noqa: F811
    from fastmta.testing.sink import unused_port

    port = unused_port()
    p, cfg = serve(config(port, tmp_path))
    assert wait_until(lambda: greeting(port).startswith(b"220 one.test"))
    assert wait_until(lambda: len(children(p.pid)) == 2)
    workers = set(children(p.pid))
    good = config(port, tmp_path, hostname="two.test")
    for bad in (
        good.encode() + b"# caf\xe9\n",  # not UTF-8
        (good + f'[policy]\nusers_file = "{tmp_path}/missing/users"\n').encode(),
        good.replace("two.test", "bad host\\r\\nX-Injected: 1").encode(),
    ):
        with open(cfg, "wb") as f:
            f.write(bad)
        p.send_signal(signal.SIGHUP)
        time.sleep(1.5)
        assert p.poll() is None
        assert set(children(p.pid)) == workers  # the running workers were kept
        assert greeting(port).startswith(b"220 one.test")
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=40)
    assert p.returncode == 0, err
    assert err.count("reload failed, keeping the running configuration") == 3, err
    assert "not UTF-8 at byte" in err and "policy.users_file: cannot read" in err
    assert "Traceback" not in err


# --------------------------------------------------------------------------- serve: paths


def test_spool_and_log_paths_are_clear_errors(tmp_path):
    from fastmta.testing.sink import unused_port

    afile = tmp_path / "afile"
    afile.write_text("x")
    listen = f"127.0.0.1:{unused_port()}"
    for spool, why in (
        (afile, "exists and is not a directory"),
        (afile / "sub", "Not a directory"),
    ):
        r = run("serve", "--listen", listen, "--spool", str(spool))
        assert r.returncode == 2, r.stderr
        assert f"config error: server.spool_dir: cannot use {spool}: {why}".encode() in r.stderr
        assert b"Traceback" not in r.stderr
    cfg = tmp_path / "c.toml"
    log_file = tmp_path / "missing" / "fastmta.log"
    cfg.write_text(f'[server]\nlog_file = "{log_file}"\nspool_dir = "{tmp_path}/sp"\n')
    r = run("serve", "--listen", listen, "--config", str(cfg))
    assert r.returncode == 2, r.stderr
    assert f"config error: server.log_file: cannot open {log_file}: No such file".encode() in (
        r.stderr
    )
    assert b"Traceback" not in r.stderr


# --------------------------------------------------------------------------- send


def test_send_refuses_control_characters_in_the_full_name(tmp_path):
    spool = str(tmp_path / "spool")
    for name in ("Evil\r\nBcc: x@evil.test", "Evil\nX-Injected: yes", "a\x7fb"):
        r = run("send", "--spool", spool, "-f", "a@b.test", "-F", name, "u@local.test",
                stdin=b"Subject: a\n\nbody\n")  # fmt: skip
        assert r.returncode == 64 and b"bad full name (-F)" in r.stderr
    assert not os.path.isdir(os.path.join(spool, "incoming")) or not os.listdir(
        os.path.join(spool, "incoming")
    )
    with pytest.raises(ValueError):
        prepare_message(b"x\n", extract=False, hostname="h", sender="a@b.test", fullname="a\nb")


def test_send_refuses_nul_and_bad_addresses(tmp_path):
    spool = str(tmp_path / "spool")
    r = run("send", "--spool", spool, "-f", "a@b.test", "u@local.test", stdin=b"Sub\0ject: a\n\n")
    assert r.returncode == 65 and b"a NUL octet at byte 3" in r.stderr
    for rcpt in ("u@local.test.", '"a"b"@local.test'):
        r = run("send", "--spool", spool, "-f", "a@b.test", rcpt, stdin=b"Subject: a\n\nb\n")
        assert r.returncode == 64 and b"bad recipient address" in r.stderr, rcpt
    r = run("send", "--spool", spool, "-f", "a@b.test.", "u@local.test", stdin=b"S: a\n\nb\n")
    assert r.returncode == 64 and b"bad sender address" in r.stderr


def test_send_breaks_long_lines_like_postfix():
    body = b"y" * 2500
    wire, _ = prepare_message(
        b"Subject: " + b"s" * 1200 + b"\n\n" + body + b"\n", extract=False, hostname="h",
        sender="a@b.test",
    )  # fmt: skip
    lines = wire.split(b"\r\n")
    assert max(len(ln) for ln in lines) == 998
    # the pieces, each continuation starting with a space (a fold in the header)
    assert b"".join(ln[1:] if ln.startswith(b" ") else ln for ln in lines).count(body) == 1
    subject = [ln for ln in lines if ln.startswith(b"Subject: ")][0]
    assert lines[lines.index(subject) + 1].startswith(b" s")
    # never inside a UTF-8 sequence
    text = ("é" * 1000).encode()
    pieces = fold_long_line(text)
    assert all(len(p) <= 998 for p in pieces)
    for p in pieces:
        p.decode("utf-8")
    assert b"".join(p[1:] if i else p for i, p in enumerate(pieces)) == text


def test_a_new_worker_never_runs_the_supervisors_signal_handlers(monkeypatch):
    """A SIGTERM that reaches a worker before its event loop installs its own handler must
    not run the supervisor's (which would signal the worker's siblings): the child starts
    with default dispositions for SIGTERM/SIGINT and ignores SIGHUP."""
    sup = Supervisor(load_config(None), None)
    r, w = os.pipe()

    def worker(config, index, count, counts=None, sockets=None):
        names = {signal.SIG_DFL: "default", signal.SIG_IGN: "ignore"}
        got = [names.get(signal.getsignal(s), "handler") for s in sorted(_SIGNALS)]
        os.write(w, ",".join(got).encode())
        return 0

    monkeypatch.setattr(app, "_worker_process", worker)
    saved = {s: signal.getsignal(s) for s in _SIGNALS}
    try:
        for s in _SIGNALS:
            signal.signal(s, sup._on_stop if s != signal.SIGHUP else sup._on_hup)
        sup.spawn(0)
        (pid,) = sup.children
        os.waitpid(pid, 0)
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
        os.close(w)
    got = os.read(r, 100).decode().split(",")
    os.close(r)
    want = {signal.SIGTERM: "default", signal.SIGINT: "default", signal.SIGHUP: "ignore"}
    assert got == [want[s] for s in sorted(_SIGNALS)]
    assert signal.pthread_sigmask(signal.SIG_BLOCK, set()) == set()  # nothing left blocked


_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
