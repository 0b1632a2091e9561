"""Local Maildir delivery: recipient checks, the tmp-then-new protocol, content conversion."""

from __future__ import annotations

import mailbox
import os
import re
import threading

import pytest

from fastmta.delivery.maildir import MaildirDelivery, UnknownRecipient, unstuff_to_lf

NAME = re.compile(r"^(\d+)\.M(\d+)P(\d+)Q(\d+)\.([^,/]+),S=(\d+)$")

WIRE = (
    b"From: Alice <alice@example.org>\r\n"
    b"Subject: dots\r\n"
    b"\r\n"
    b"..leading dot line\r\n"
    b"middle\r\n"
    b"...two dots\r\n"
    b"..\r\n"  # a line holding a single dot, stuffed
    b"last line\r\n"
)


def test_unstuff_to_lf():
    assert unstuff_to_lf(b"..a\r\nb\r\n..\r\n...c\r\n") == b".a\nb\n.\n..c\n"
    assert unstuff_to_lf(b"x\r\n.. y\r\n") == b"x\n. y\n"
    assert unstuff_to_lf(b"no final newline") == b"no final newline\n"
    assert unstuff_to_lf(b"") == b""
    assert unstuff_to_lf(b"a\r\rb\r\n") == b"a\r\rb\n"  # a lone CR is data, left alone


def test_check_user_lists_detail_case_and_catch_all(tmp_path):
    md = MaildirDelivery(tmp_path, users={"Example.COM": {"Bob", "carol"}})
    assert md.check("bob@example.com") is None
    assert md.check("BOB+news@EXAMPLE.com") is None
    assert md.check("<carol@example.com>") is None
    assert md.check("anyone@other.example") is None  # no user list for that domain
    assert md.check("eve@example.com") == (
        550,
        "5.1.1",
        "<eve@example.com>: Recipient address rejected: User unknown",
    )
    assert md.check("bob-x@example.com") is not None  # "-" is not the separator

    dashed = MaildirDelivery(tmp_path, users={"example.com": {"bob"}}, recipient_delimiter="-")
    assert dashed.check("bob-x@example.com") is None
    assert dashed.check("bob+x@example.com") is not None

    catch = MaildirDelivery(tmp_path, users={"example.com": {"bob"}}, catch_all="postmaster")
    assert catch.check("eve@example.com") is None
    assert catch.maildir_path("eve@example.com") == str(tmp_path / "example.com" / "postmaster")
    other = MaildirDelivery(tmp_path, users={"example.com": set()}, catch_all="All@Catch.example")
    assert other.maildir_path("x@example.com") == str(tmp_path / "catch.example" / "all")


@pytest.mark.parametrize(
    "address",
    ["../../etc@example.com", "a/b@example.com", "..@example.com", "bob@..", "bob@a/b", "x\x01@e.x"]
    + ["+detail@example.com", "no-domain", "bob@"],
)
def test_names_that_would_escape_the_root_are_refused(tmp_path, address):
    md = MaildirDelivery(tmp_path / "mail", fsync=False)
    reply = md.check(address)
    assert reply is not None and reply[:2] == (553, "5.1.3")
    with pytest.raises(UnknownRecipient) as exc:
        md.deliver(address, b"x\r\n", return_path="a@b")
    assert exc.value.reply == reply
    assert not (tmp_path / "mail").exists()  # nothing created anywhere


def test_deliver_writes_new_file_with_headers_lf_and_unstuffed_body(tmp_path):
    md = MaildirDelivery(tmp_path, hostname="mx:1/a,b")
    path = md.deliver("Bob+Lists@Example.com", WIRE, return_path="alice@example.org")
    maildir = tmp_path / "example.com" / "bob"
    assert os.path.dirname(path) == str(maildir / "new")
    assert sorted(os.listdir(maildir)) == ["cur", "new", "tmp"]
    assert os.listdir(maildir / "tmp") == []
    name = os.path.basename(path)
    m = NAME.match(name)
    assert m, name
    assert m.group(3) == str(os.getpid())
    assert m.group(5) == r"mx\0721\057a\054b"  # maildir escapes for "/", ":" and ","
    data = open(path, "rb").read()
    assert int(m.group(6)) == len(data)
    assert data == (
        b"Return-Path: <alice@example.org>\n"
        b"Delivered-To: Bob+Lists@Example.com\n"
        b"From: Alice <alice@example.org>\n"
        b"Subject: dots\n"
        b"\n"
        b".leading dot line\n"
        b"middle\n"
        b"..two dots\n"
        b".\n"
        b"last line\n"
    )
    assert b"\r" not in data
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"


def test_null_sender_and_no_delivered_to(tmp_path):
    md = MaildirDelivery(tmp_path, fsync=False)
    path = md.deliver("bob@example.com", b"Subject: x\r\n\r\nhi\r\n", return_path="<>")
    data = open(path, "rb").read()
    assert data.startswith(b"Return-Path: <>\nDelivered-To: bob@example.com\n")
    path2 = md.deliver(
        "bob@example.com", b"Subject: y\r\n\r\nhi\r\n", return_path="", delivered_to=False
    )
    assert open(path2, "rb").read() == b"Return-Path: <>\nSubject: y\n\nhi\n"
    with pytest.raises(ValueError):
        md.deliver("bob@example.com", b"x\r\n", return_path="a@b\r\nX-Evil: 1")


def test_python_mailbox_reads_what_we_deliver(tmp_path):
    md = MaildirDelivery(tmp_path, fsync=False)
    for i in range(3):
        md.deliver("bob@example.com", b"Subject: n%d\r\n\r\nbody\r\n" % i, return_path="a@b")
    box = mailbox.Maildir(str(tmp_path / "example.com" / "bob"), create=False)
    subjects = sorted(msg["Subject"] for msg in box)
    assert subjects == ["n0", "n1", "n2"]
    assert all(msg["Return-Path"] == "<a@b>" for msg in box)
    assert all(msg.get_subdir() == "new" for msg in box)


def test_fsyncs_file_new_dir_and_created_dirs(tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    root = tmp_path / "mail"
    md = MaildirDelivery(root)
    path = md.deliver("bob@example.com", b"a\r\n", return_path="x@y")
    maildir = root / "example.com" / "bob"
    tmp_name = str(maildir / "tmp" / os.path.basename(path))
    assert tmp_name in synced  # the data, before the rename
    assert str(maildir / "new") in synced  # the directory entry, after it
    assert synced.index(tmp_name) < synced.index(str(maildir / "new"))
    for created_in in (tmp_path, root, root / "example.com", maildir):
        assert str(created_in) in synced  # every new directory's entry is durable
    synced.clear()
    md.deliver("bob@example.com", b"b\r\n", return_path="x@y")
    assert len(synced) == 2  # known Maildir: file and new/ only
    synced.clear()
    MaildirDelivery(root, fsync=False).deliver("carol@example.com", b"c\r\n", return_path="")
    assert synced == []


def test_failure_raises_oserror_and_leaves_no_tmp_file(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(OSError):
        MaildirDelivery(tmp_path / "file").deliver("bob@example.com", b"x\r\n", return_path="")

    md = MaildirDelivery(tmp_path / "mail", fsync=False)
    md.deliver("bob@example.com", b"x\r\n", return_path="")

    def broken_rename(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "rename", broken_rename)
    with pytest.raises(OSError):
        md.deliver("bob@example.com", b"y\r\n", return_path="")
    maildir = tmp_path / "mail" / "example.com" / "bob"
    assert os.listdir(maildir / "tmp") == []
    assert len(os.listdir(maildir / "new")) == 1


def test_maildir_removed_behind_our_back_is_recreated(tmp_path):
    import shutil

    md = MaildirDelivery(tmp_path, fsync=False)
    md.deliver("bob@example.com", b"x\r\n", return_path="")
    shutil.rmtree(tmp_path / "example.com")
    path = md.deliver("bob@example.com", b"y\r\n", return_path="")
    assert os.path.exists(path)


def test_concurrent_deliveries_from_threads_get_unique_names(tmp_path):
    md = MaildirDelivery(tmp_path, fsync=False)
    paths: list[str] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        for i in range(100):
            p = md.deliver(f"user{i % 3}@example.com", b"m %d %d\r\n" % (n, i), return_path="")
            with lock:
                paths.append(p)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(paths) == len(set(paths)) == 800
    bodies = {open(p, "rb").read().split(b"\n")[2] for p in paths}
    assert len(bodies) == 800
