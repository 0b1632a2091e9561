"""`fastmta queue suspend/resume` against a real `fastmta serve` (and with it stopped): mail
for a suspended domain is deferred without a connection, and flows again on resume or when a
time-limited suspension runs out. The relayhost is an in-process Sink that accepts all."""

from __future__ import annotations

import os
import time

from test_queuecmd import WAIT, Counting, Server, cli, send

from fastmta.queue import suspend
from fastmta.testing.sink import Behaviour, Sink

SUSPENDED = "451 4.3.2 Delivery to slow.test suspended by the mail system administrator"


def test_suspend_defers_without_a_connection_and_resume_delivers_at_once(tmp):
    peer = Counting()
    with Sink(behaviour=Behaviour(rcpt_reply=peer)) as sink:
        srv = Server(tmp, sink.port, workers=2)
        with srv.start():
            r = srv.q("suspend", "--domain", "Slow.Test.", "--reason", "421s from them")
            assert (r.returncode, r.stdout.strip()) == (0, "suspended: slow.test (until resumed)")
            qid = send(srv.port, ["a@slow.test", "b@fast.test"], "half")
            assert sink.wait_for(1, WAIT)
            envs = srv.wait_attempted([qid])
            a = envs[qid].recipients[0]
            assert (a.address, a.state) == ("a@slow.test", 3)
            assert a.last_reply == SUSPENDED + ": 421s from them"
            assert envs[qid].next_attempt > time.time() + 3000  # its retry schedule runs on
            assert peer.offered == {"b@fast.test": 1}  # nothing sent to slow.test

            r = srv.q("suspend")
            assert r.returncode == 0 and r.stdout.startswith("slow.test  since ")
            assert "until resumed  (421s from them)" in r.stdout
            assert r.stdout.endswith("-- 1 suspended domain\n")

            r = srv.q("resume", "--domain", "slow.test")
            assert r.returncode == 0 and "resumed: slow.test" in r.stdout, r.stderr
            assert sink.wait_for(2, WAIT)
            srv.wait_until(lambda e: not e, "an empty queue")
            assert srv.q("suspend").stdout == "-- 0 suspended domains\n"
    assert [m.recipients for m in sink.messages] == [["b@fast.test"], ["a@slow.test"]]
    assert not os.path.exists(suspend.path(srv.spool))


def test_suspension_made_while_stopped_holds_at_start_then_runs_out(tmp):
    peer = Counting()
    with Sink(behaviour=Behaviour(rcpt_reply=peer)) as sink:
        srv = Server(tmp, sink.port)
        r = srv.q("suspend", "--domain", "slow.test", "--for", "5s")
        assert r.returncode == 0 and "(the server is not running" in r.stdout, r.stderr
        with srv.start():
            qid = send(srv.port, ["a@slow.test"], "later")
            envs = srv.wait_attempted([qid])
            assert envs[qid].recipients[0].last_reply == SUSPENDED
            assert sink.count == 0
            # the suspension runs out: delivered then, not at the retry an hour away
            assert sink.wait_for(1, WAIT)
            srv.wait_until(lambda e: not e, "an empty queue")
    assert peer.offered == {"a@slow.test": 1}


def test_resume_on_a_stopped_server_makes_the_mail_due_at_start(tmp):
    with Sink() as sink:
        srv = Server(tmp, sink.port)
        assert srv.q("suspend", "--domain", "slow.test").returncode == 0
        with srv.start():
            qid = send(srv.port, ["a@slow.test"], "wait")
            srv.wait_attempted([qid])
            srv.stop()
            r = srv.q("resume", "--all")
            assert r.returncode == 0 and "resumed: slow.test" in r.stdout, r.stderr
            srv.start()
            assert sink.wait_for(1, WAIT)


def test_suspend_errors_are_usage_errors(tmp):
    spool = os.path.join(tmp, "spool")
    r = cli("queue", "--spool", spool, "suspend", "--domain", "not a domain")
    assert r.returncode == 2 and "is not a domain name" in r.stderr
    r = cli("queue", "--spool", spool, "suspend", "--domain", "x.test", "--for", "soon")
    assert r.returncode == 2 and "--for: expected a duration" in r.stderr
    r = cli("queue", "--spool", spool, "resume")
    assert r.returncode == 2 and "give --domain (repeatable) or --all" in r.stderr
    r = cli("queue", "--spool", spool, "suspend", "--domain", "x.test", "--for", "0s")
    assert r.returncode == 2 and "--for: must be more than 0" in r.stderr
    r = cli("queue", "--spool", spool, "resume", "--domain", "never.test")
    assert r.returncode == 1 and "never.test was not suspended" in r.stderr
    os.makedirs(spool)
    with open(suspend.path(spool), "w") as f:
        f.write('{"domain": "x.test"}\n')
    r = cli("queue", "--spool", spool, "suspend")
    assert r.returncode == 2 and "suspended.json, line 1" in r.stderr


def test_load_and_save_keep_only_active_suspensions(tmp):
    s = suspend.Suspension
    suspend.save(tmp, {"a.test": s("a.test", 1.0), "b.test": s("b.test", 1.0, until=50.0)})
    assert set(suspend.load(tmp, now=10.0)) == {"a.test", "b.test"}
    assert set(suspend.load(tmp, now=60.0)) == {"a.test"}
    got = suspend.load(tmp, now=60.0)
    assert suspend.suspended(got, "a.test", 60.0) and not suspend.suspended(got, "b.test", 60.0)
    assert str(got["a.test"].reply()).startswith("451 4.3.2 Delivery to a.test suspended")
    suspend.save(tmp, {})
    assert not os.path.exists(suspend.path(tmp)) and suspend.load(tmp) == {}


def test_a_damaged_list_does_not_make_a_run_out_suspension_fire_again(tmp):
    """The file goes bad while a timed suspension runs: the engine keeps its list, less the
    suspension that ran out, and its timer fires once, not every 10 ms."""
    import asyncio

    from fastmta.config import load_config
    from fastmta.delivery.engine import DeliveryEngine
    from fastmta.spool import Spool

    config = load_config(None, {"server": {"spool_dir": tmp}})
    now = time.time()
    suspend.save(tmp, {"a.test": suspend.Suspension("a.test", now, until=now + 0.1)})

    async def main() -> int:
        engine = DeliveryEngine(config, Spool(os.path.join(tmp, "shard-0")))
        engine._loop = asyncio.get_running_loop()
        engine.load_suspensions()
        with open(suspend.path(tmp), "w") as f:
            f.write("damaged\n")
        fired = 0
        ran_out = engine._suspensions_ran_out

        def counting() -> None:
            nonlocal fired
            fired += 1
            ran_out()

        engine._suspensions_ran_out = counting
        engine.load_suspensions()  # (re-arms the timer with the wrapped callback)
        await asyncio.sleep(0.5)
        assert engine._suspended == {} and engine._suspension_timer is None
        engine.resolver.close()
        return fired

    assert asyncio.run(main()) == 1
