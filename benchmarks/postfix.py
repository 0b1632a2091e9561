"""A private Postfix instance for the benchmarks: install (if absent), configure, start, stop.

Everything lives under one temporary directory (config_directory, queue_directory,
data_directory, maillog_file); the instance listens on its own loopback port, and only it is
started and stopped (``postfix -c DIR start|stop``, then its master PID if it lingers). The
system Postfix, if any, is never touched.

Two modes:

``hold``   every accepted message is put on hold (``check_recipient_access static:HOLD``): the
           ingest benchmark. Postfix's cleanup(8) fsyncs the queue file before smtpd answers 250
           (Postfix default), so this measures durable ingest.
``relay``  every message goes to ``relayhost`` (``[127.0.0.1]:PORT``), or per domain through
           ``transport`` entries (``{"d1.test": "smtp:[127.0.0.11]:PORT"}``): the end-to-end
           benchmark. Postfix cannot use a DNS server on a custom port, hence transport maps.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

__all__ = ["PostfixInstance", "ensure_postfix", "postfix_available"]

POSTFIX_BIN = "/usr/sbin/postfix"
START_TIMEOUT = 30.0  # seconds for `postfix start` and for the listener to appear
STOP_TIMEOUT = 30.0  # seconds for `postfix stop` before the master is killed by PID


def postfix_available() -> bool:
    """True when the postfix command and the daemons are installed."""
    return shutil.which("postfix") is not None or os.path.exists(POSTFIX_BIN)


def ensure_postfix(log=print) -> bool:
    """Install Postfix non-interactively (apt-get, debconf "No configuration") when absent.

    Returns True when Postfix is available afterwards. Needs root and apt-get; never raises.
    """
    if postfix_available():
        return True
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        log("postfix: not installed, and cannot install it (need root and apt-get)")
        return False
    log("postfix: installing (apt-get, debconf main_mailer_type = No configuration)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        subprocess.run(
            ["debconf-set-selections"],
            input=b"postfix postfix/main_mailer_type select No configuration\n",
            check=True,
            timeout=60,
            env=env,
        )
        subprocess.run(["apt-get", "update", "-q"], check=True, timeout=600, env=env)
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", "postfix"],
            check=True,
            timeout=900,
            env=env,
        )
    except (OSError, subprocess.SubprocessError) as e:
        log(f"postfix: install failed: {e}")
        return False
    return postfix_available()


def _postconf(name: str, default: str) -> str:
    try:
        out = subprocess.run(
            ["postconf", "-dh", name], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        return out or default
    except (OSError, subprocess.SubprocessError):
        return default


class PostfixInstance:
    """One private Postfix under ``base`` listening on ``127.0.0.1:port``.

    base        empty directory that will hold etc/, spool/, data/, maillog
    port        smtpd port on 127.0.0.1
    mode        "hold" or "relay" (module docstring)
    relayhost   relay mode: "[127.0.0.1]:PORT" (Postfix relayhost syntax)
    transport   relay mode: domain -> "smtp:[IP]:PORT" (transport_maps, texthash)
    """

    def __init__(
        self,
        base: str,
        port: int,
        *,
        mode: str = "relay",
        relayhost: str = "",
        transport: dict[str, str] | None = None,
    ) -> None:
        if mode not in ("hold", "relay"):
            raise ValueError(f"mode must be 'hold' or 'relay', not {mode!r}")
        self.base = os.path.abspath(base)
        self.port = port
        self.mode = mode
        self.relayhost = relayhost
        self.transport = dict(transport or {})
        self.config_dir = os.path.join(self.base, "etc")
        self.queue_dir = os.path.join(self.base, "spool")
        self.data_dir = os.path.join(self.base, "data")
        self.maillog = os.path.join(self.base, "maillog")
        self.started = False

    # ------------------------------------------------------------------ configuration

    def main_cf(self) -> str:
        restrictions = "permit_mynetworks, reject_unauth_destination"
        if self.mode == "hold":
            restrictions = "check_recipient_access static:HOLD, " + restrictions
        lines = {
            "compatibility_level": "3.6",
            "config_directory": self.config_dir,
            "queue_directory": self.queue_dir,
            "data_directory": self.data_dir,
            "command_directory": _postconf("command_directory", "/usr/sbin"),
            "daemon_directory": _postconf("daemon_directory", "/usr/lib/postfix/sbin"),
            "meta_directory": _postconf("meta_directory", "/etc/postfix"),
            "shlib_directory": _postconf("shlib_directory", "/usr/lib/postfix"),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "maillog_file": self.maillog,
            "maillog_file_prefixes": self.base,
            "myhostname": "postfix-bench.test",
            "mydomain": "postfix-bench.test",
            "myorigin": "$myhostname",
            "mydestination": "",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtpd_recipient_restrictions": restrictions,
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "relayhost": self.relayhost,
            "smtp_tls_security_level": "none",
            "smtpd_tls_security_level": "none",
            "biff": "no",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "append_dot_mydomain": "no",
        }
        if self.transport:
            lines["transport_maps"] = "texthash:" + os.path.join(self.config_dir, "transport")
        return "".join(f"{k} = {v}\n" for k, v in lines.items())

    def master_cf(self) -> str:
        """The system master.cf with the smtp inet service moved to our port, no chroot."""
        src = os.path.join(_postconf("config_directory", "/etc/postfix"), "master.cf")
        if not os.path.exists(src):
            src = os.path.join(_postconf("meta_directory", "/etc/postfix"), "master.cf.proto")
        out = []
        with open(src, encoding="utf-8") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 2 and fields[0] == "smtp" and fields[1] == "inet":
                    line = f"127.0.0.1:{self.port} inet n - n - - smtpd\n"
                out.append(line)
        text = "".join(out)
        if "postlogd" not in text:  # maillog_file needs postlogd (Postfix >= 3.4)
            text += "postlog   unix-dgram n  -       n       -       1       postlogd\n"
        return text

    def configure(self) -> None:
        """Write main.cf, master.cf (and the transport map) under ``base``/etc."""
        os.makedirs(self.base, exist_ok=True)
        os.chmod(self.base, 0o755)  # mkdtemp gives 0700; Postfix daemons run as mail_owner
        os.makedirs(self.config_dir, exist_ok=True)
        os.makedirs(self.data_dir, exist_ok=True)
        os.makedirs(self.queue_dir, exist_ok=True)
        with open(os.path.join(self.config_dir, "main.cf"), "w", encoding="utf-8") as f:
            f.write(self.main_cf())
        with open(os.path.join(self.config_dir, "master.cf"), "w", encoding="utf-8") as f:
            f.write(self.master_cf())
        if self.transport:
            with open(os.path.join(self.config_dir, "transport"), "w", encoding="utf-8") as f:
                f.writelines(f"{d} {t}\n" for d, t in self.transport.items())
        subprocess.run(
            ["postconf", "-c", self.config_dir, "-F", "*/*/chroot = n"],
            check=True,
            timeout=30,
            capture_output=True,
        )
        shutil.chown(self.data_dir, "postfix")

    # ------------------------------------------------------------------ lifecycle

    def _postfix(self, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["postfix", "-c", self.config_dir, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start(self) -> None:
        """Configure and start; returns when the master runs (the caller waits for the port)."""
        self.configure()
        r = self._postfix("start", timeout=START_TIMEOUT)
        if r.returncode != 0:
            raise RuntimeError(f"postfix start failed: {r.stdout}{r.stderr}{self.diagnose()}")
        self.started = True
        deadline = time.monotonic() + START_TIMEOUT
        while self.master_pid() is None:
            if time.monotonic() > deadline:
                raise RuntimeError("postfix master did not write its PID file")
            time.sleep(0.05)

    def diagnose(self) -> str:
        """Postfix prints fatal errors only to a terminal: rerun `postfix check` under script(1)."""
        if shutil.which("script") is None:
            return ""
        cmd = f"postfix -c {self.config_dir} check"
        try:
            r = subprocess.run(
                ["script", "-qc", cmd, "/dev/null"], capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.SubprocessError):
            return ""
        return r.stdout

    def master_pid(self) -> int | None:
        try:
            with open(os.path.join(self.queue_dir, "pid", "master.pid"), encoding="ascii") as f:
                pid = int(f.read().strip())
        except (OSError, ValueError):
            return None
        return pid if os.path.exists(f"/proc/{pid}") else None

    def stop(self) -> None:
        """Stop this instance only: `postfix -c DIR stop`, then its master by PID if needed."""
        if not self.started:
            return
        pid = self.master_pid()
        try:
            self._postfix("stop", timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + STOP_TIMEOUT
        while pid is not None and os.path.exists(f"/proc/{pid}"):
            if time.monotonic() > deadline:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                break
            time.sleep(0.05)
        self.started = False

    # ------------------------------------------------------------------ counting

    def count_queue(self, subdir: str) -> int:
        """Queue files in ``hold``, ``incoming``, ``active``, ``deferred`` ... (recursive)."""
        n = 0
        for _, _, files in os.walk(os.path.join(self.queue_dir, subdir)):
            n += len(files)
        return n

    def log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.maillog, encoding="utf-8", errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""
