"""Prometheus metrics (server.metrics_listen): the exposition text, and a real `fastmta serve`
with two workers scraped over HTTP on loopback."""

from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request

import pytest
from e2e_harness import REPO, ServerProcess, child_env, fastmta_command, free_port, send

from fastmta.metrics import render
from fastmta.protocol.replies import reply
from fastmta.testing.sink import Behaviour, Sink

MSG = b"From: a@x.test\r\nTo: u@local.test\r\nSubject: m\r\n\r\nhello\r\n"


def test_render_exposition_format():
    text = render([(0, {"delivered": 3, "queued": 2, "pid": 11}), (1, {"delivered": 4})])
    lines = text.splitlines()
    assert "fastmta_workers_up 2" in lines
    assert "# TYPE fastmta_delivered_recipients_total counter" in lines
    assert 'fastmta_delivered_recipients_total{worker="0"} 3' in lines
    assert 'fastmta_delivered_recipients_total{worker="1"} 4' in lines
    assert "# TYPE fastmta_queued_messages gauge" in lines
    assert 'fastmta_queued_messages{worker="0"} 2' in lines
    assert not any("pid" in line for line in lines)  # only the documented metrics
    text = render([(0, {"spool_damaged_bytes": 120, "spool_write_errors": 0})])
    assert 'fastmta_spool_damaged_bytes_total{worker="0"} 120' in text.splitlines()
    assert 'fastmta_spool_write_errors_total{worker="0"} 0' in text.splitlines()
    assert text.endswith("\n")
    text = render([(0, {"failures": {"SpamBlock": 2, "InvalidRecipient": 5}}), (1, {})])
    assert text.splitlines()[-3:] == [
        "# TYPE fastmta_failures_total counter",
        'fastmta_failures_total{worker="0",class="InvalidRecipient"} 5',
        'fastmta_failures_total{worker="0",class="SpamBlock"} 2',
    ]


def scrape(port: int, path: str = "/metrics") -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode()


def metric(text: str, line_start: str) -> int:
    values = [int(x.split()[-1]) for x in text.splitlines() if x.startswith(line_start)]
    return sum(values)


def test_scrape_a_running_server(tmp_path):
    port = free_port()
    over = {
        "server": {"workers": 2, "metrics_listen": f"127.0.0.1:{port}", "hold_delivery": True},
        "policy": {"local_domains": ["local.test"]},
    }
    with ServerProcess(tmp_path, over) as srv:
        srv.wait_workers(2)
        for i in range(6):
            send(srv.host, srv.port, "a@x.test", [f"u{i}@local.test"], MSG)
        deadline = time.monotonic() + 15
        while True:
            try:
                status, ctype, text = scrape(port)
            except OSError:  # worker 0 not listening yet
                status, ctype, text = 0, "", ""
            if "fastmta_workers_up 2" in text and metric(text, "fastmta_spool_messages{") == 6:
                break
            assert time.monotonic() < deadline, text or "no metrics endpoint"
            time.sleep(0.2)
        assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
        assert metric(text, "fastmta_held_messages{") == 0
        assert {line.split("}")[0] for line in text.splitlines() if "spool_messages{" in line} == {
            'fastmta_spool_messages{worker="0"',
            'fastmta_spool_messages{worker="1"',
        }
        for w in (0, 1):  # the spool's own health: nothing cut, skipped or failed here
            for name in ("truncated_bytes", "damaged_bytes", "write_errors"):
                assert f'fastmta_spool_{name}_total{{worker="{w}"}} 0' in text.splitlines()
        assert scrape(port, "/other")[0] == 404


@pytest.mark.parametrize("value", ["nonsense:port", "127.0.0.1:0", "[::1"])
def test_bad_metrics_address_is_a_config_error(tmp_path, value):
    from fastmta.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="server.metrics_listen"):
        load_config(None, {"server": {"metrics_listen": value}})


def test_failures_by_class_in_metrics_and_queue_stats(tmp_path):
    """Each failed attempt is counted by its bounce class: the Prometheus endpoint shows it
    per worker, `fastmta queue stats` sums it (through the workers' control sockets)."""
    port = free_port()
    unknown = Behaviour(rcpt_reply=lambda a: reply(550, "5.1.1", "no such user"))
    with Sink("127.0.0.1", 0, unknown) as sink:
        over = {
            "server": {"metrics_listen": f"127.0.0.1:{port}"},
            "delivery": {"relayhost": f"[127.0.0.1]:{sink.port}"},
        }
        with ServerProcess(tmp_path, over) as srv:
            send(srv.host, srv.port, "", ["u@remote.test"], MSG)  # null sender: no DSN back
            deadline = time.monotonic() + 15
            while "InvalidRecipient" not in (text := scrape(port)[2]):
                assert time.monotonic() < deadline, text
                time.sleep(0.2)
            assert 'fastmta_failures_total{worker="0",class="InvalidRecipient"} 1' in text
            done = subprocess.run(
                fastmta_command("queue", "stats", "--config", srv.config_path),
                capture_output=True, cwd=REPO, env=child_env(), timeout=20,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            assert b"failed attempts by class: InvalidRecipient 1" in done.stdout
