"""Damage and device faults on a real mount: never wrong bytes, errors as errnos, the daemon
keeps serving, nothing stored is lost or silently altered, fsck finds and repairs the rest.

Device faults come from the fault-injection layer of kvfs.store (KVFS_FAULTS in the daemon's
environment; rules changed at run time through the control file). Damage is made the way a
disk or an operator makes it: bytes flipped in a device file, a device truncated, LMDB's file
overwritten."""

import errno
import json
import os
import random

import pytest

from conftest import run_kvfs
from kvfs import meta as M
from kvfs.tools.bench import drop_caches
from kvfs.tools.client import Remote
from kvfs.warehouse import Warehouse

KiB = 1 << 10


def content(key: str, size: int = 64 * KiB) -> bytes:
    return random.Random(key).randbytes(size)


def write(path, data, fsync=False):
    with open(path, "wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def faults(m, rules=None, drop_cache=True):
    args = {"drop_cache": drop_cache}
    if rules is not None:
        args["rules"] = rules
    reply = Remote(m.path).call("faults", **args)
    assert drop_caches()
    return reply


def stats(m) -> dict:
    return json.loads(run_kvfs("stat", m.path, "--json").stdout)


def fsck(warehouse, *extra, check=True) -> tuple[int, dict]:
    res = run_kvfs("fsck", warehouse, "--json", "--verify-data", *extra, check=False)
    report = json.loads(res.stdout) if res.stdout.strip().startswith("{") else {"stderr": res.stderr}
    if check:
        assert res.returncode == 0 and report["clean"], report
    return res.returncode, report


def extent_of(warehouse, rel: str, idx: int = 0) -> tuple[str, int, int]:
    """(device file, offset, stored length) of block `idx` of a file (warehouse not mounted)."""
    w = Warehouse(str(warehouse), check_only=True)
    try:
        _, _, ino = w.resolve(rel)
        with w.meta.begin() as txn:
            h = txn.get(M.bmap_key(ino, idx), db=w.meta.db["bmap"])
            rec = w.meta.get_block(txn, h)
        return w.devices.devices[rec.dev].path, rec.offset, rec.stored_len
    finally:
        w.close()


def flip(device: str, offset: int) -> None:
    fd = os.open(device, os.O_RDWR)
    try:
        b = os.pread(fd, 1, offset)
        os.pwrite(fd, bytes([b[0] ^ 0x5A]), offset)
    finally:
        os.close(fd)


@pytest.fixture
def fault_mount(make_mount, monkeypatch):
    monkeypatch.setenv("KVFS_FAULTS", "{}")
    return make_mount(block_size="64K")


def test_device_read_errors_are_eio_and_the_rest_is_served(fault_mount):
    m = fault_mount
    names = [f"f{i}" for i in range(16)]
    for n in names:
        write(m.p(n), content(n))
    faults(m, [{"op": "read", "device": 0, "errno": "EIO"}])
    failed = served = 0
    for n in names:
        try:
            data = read(m.p(n))
        except OSError as exc:
            assert exc.errno == errno.EIO
            failed += 1
        else:
            assert data == content(n), f"{n}: wrong bytes served"
            served += 1
    assert failed and served, (failed, served)  # striped: some files on each device
    assert stats(m)["counters"]["device_errors"] >= failed
    faults(m, [])  # the device is back: a read error is not damage, nothing was dropped
    for n in names:
        assert read(m.p(n)) == content(n)
    assert stats(m)["counters"].get("corrupt_blocks", 0) == 0
    m.umount()
    fsck(m.warehouse)


@pytest.mark.parametrize("err", ["EIO", "ENOSPC"])
def test_device_write_errors_reach_the_writer_and_publish_nothing_wrong(fault_mount, err):
    m = fault_mount
    write(m.p("before"), content("before"))
    faults(m, [{"op": "write", "errno": err}])
    with pytest.raises(OSError) as exc:
        write(m.p("during"), content("during", 200 * KiB))
    assert exc.value.errno == getattr(errno, err)
    faults(m, [])
    # What the failed writer left is empty or absent, never garbage; the rest is intact.
    assert not os.path.exists(m.p("during")) or read(m.p("during")) == b""
    assert read(m.p("before")) == content("before")
    write(m.p("after"), content("after"), fsync=True)
    assert read(m.p("after")) == content("after")
    m.umount()
    fsck(m.warehouse)


def test_a_failing_sync_is_eio_to_fsync_and_stays_so_until_remount(fault_mount):
    m = fault_mount
    faults(m, [{"op": "sync", "errno": "EIO", "count": 1}])
    fd = os.open(m.p("f"), os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, content("f"))
        for _ in range(2):  # the fault fired once, but a retry must not claim durability:
            with pytest.raises(OSError) as exc:  # the kernel may have dropped the pages
                os.fsync(fd)
            assert exc.value.errno == errno.EIO
    finally:
        os.close(fd)
    assert read(m.p("f")) == content("f")
    assert stats(m)["counters"]["device_errors"] >= 2
    m.umount()  # its last sync fails too: the warehouse is left unclean
    m.mount()  # recovery
    assert "recovered after unclean shutdown" in open(os.path.join(m.warehouse, "kvfs.log")).read()
    assert read(m.p("f")) == content("f")
    m.umount()
    fsck(m.warehouse)


def test_a_slow_device_stalls_its_writer_not_the_other_clients(make_mount, monkeypatch):
    """Device writes and the devices' sync at a checkpoint run outside the warehouse lock
    and off the event loop: while one client writes to a device that takes 1 s a write and
    fsyncs while a sync takes 2 s, other clients' lookups, listings and reads of a
    published file are answered at once (each took a whole device write or more when the
    mount wrote and synced under its lock)."""
    import threading
    import time

    monkeypatch.setenv("KVFS_FAULTS", "{}")
    m = make_mount()
    other = content("other", 256 * KiB)
    write(m.p("other"), other, fsync=True)
    faults(m, [{"op": "write", "delay": 1.0}, {"op": "sync", "delay": 2.0, "count": 1}])
    big = content("big", 3 << 20)
    done = threading.Event()
    errors = []

    def writer():
        try:
            write(m.p("big"), big, fsync=True)  # three device writes, then a slow sync
        except BaseException as exc:
            errors.append(exc)
        finally:
            done.set()

    t0 = time.monotonic()
    threading.Thread(target=writer).start()
    time.sleep(0.3)  # the writer is in its first device write
    slowest, ops, i = 0.0, 0, 0
    while not done.is_set():
        i += 1
        t = time.monotonic()
        assert not os.path.exists(m.p(f"missing-{i}"))  # a lookup the kernel has not cached
        assert "other" in os.listdir(m.path)
        fd = os.open(m.p("other"), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # (the read reaches the daemon)
            assert os.pread(fd, len(other), 0) == other
        finally:
            os.close(fd)
        slowest = max(slowest, time.monotonic() - t)
        ops += 1
        time.sleep(0.05)
    assert not errors, errors
    assert time.monotonic() - t0 >= 4.5  # (the faults did slow the writer: 3 s of writes, 2 s of sync)
    assert ops >= 20 and slowest < 0.5, (ops, slowest)
    assert read(m.p("big")) == big
    faults(m, [])
    m.umount()
    fsck(m.warehouse)


def test_fault_injection_is_off_without_the_environment(mnt):
    from kvfs.errors import QuietError

    with pytest.raises(QuietError, match="fault injection is off"):
        Remote(mnt.path).call("faults", rules=[{"op": "read"}])


def test_flipped_bytes_are_eio_counted_quarantined_and_the_file_dropped(make_mount):
    m = make_mount(block_size="64K")
    shared = content("shared")
    write(m.p("a"), shared + content("a"))   # a and b share their first block
    write(m.p("b"), shared + content("b"))
    write(m.p("c"), content("c"))
    m.umount()
    device, off, _ = extent_of(m.warehouse, "a")
    flip(device, off + 1000)
    m.mount()
    with pytest.raises(OSError) as exc:
        read(m.p("a"))
    assert exc.value.errno == errno.EIO
    assert not os.path.exists(m.p("a")), "a file with a damaged block is still served"
    assert read(m.p("c")) == content("c")
    st = stats(m)
    assert st["counters"]["corrupt_blocks"] == 1 and st["counters"]["quarantined_files"] == 1
    assert st["quarantined_blocks"] == 1
    with pytest.raises(OSError) as exc:  # b shares the damaged block: EIO, then gone
        read(m.p("b"))
    assert exc.value.errno == errno.EIO and not os.path.exists(m.p("b"))
    m.umount()
    log = open(os.path.join(m.warehouse, "kvfs.log")).read()
    assert "failed verification" in log and "/a (inode" in log and "dropped" in log
    fsck(m.warehouse)  # both holders went: so did the block and its quarantine record
    m.mount()
    write(m.p("a"), shared + content("a"))  # the same content can be stored again
    assert read(m.p("a")) == shared + content("a")


def test_fsck_finds_damage_no_mount_has_read_and_repair_drops_only_those_files(make_mount):
    m = make_mount(block_size="64K")
    for n in ("x", "y", "z"):
        write(m.p(n), content(n, 150 * KiB))
    m.umount()
    device, off, slen = extent_of(m.warehouse, "y", 1)
    flip(device, off + slen - 1)
    code, report = fsck(m.warehouse, check=False)
    assert code == 8 and any("is damaged" in p and "/y" in p for p in report["problems"]), report
    code, report = fsck(m.warehouse, "--repair", check=False)
    assert code == 0, report
    fsck(m.warehouse)
    m.mount()
    assert sorted(os.listdir(m.path)) == ["x", "z"]
    assert read(m.p("x")) == content("x", 150 * KiB) and read(m.p("z")) == content("z", 150 * KiB)


def test_a_truncated_device_is_refused_at_mount_and_fsck(make_mount):
    m = make_mount(block_size="64K")
    write(m.p("f"), content("f"))
    m.umount()
    device, _, _ = extent_of(m.warehouse, "f")
    os.truncate(device, os.path.getsize(device) // 2)
    for cmd in (["mount", m.warehouse, m.path], ["fsck", m.warehouse]):
        res = run_kvfs(*cmd, check=False)
        assert res.returncode == 9, (cmd, res.returncode, res.stderr)
        assert "smaller than its recorded" in res.stderr and "Traceback" not in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1


def _damage(meta_dir: str, how: str) -> None:
    data = os.path.join(meta_dir, "data.mdb")
    if how == "meta-pages":  # both of LMDB's meta pages overwritten
        with open(data, "r+b") as f:
            f.write(random.Random(1).randbytes(8192))
    else:  # "truncated": half of the file gone
        os.truncate(data, os.path.getsize(data) // 2)


@pytest.mark.parametrize("how", ["meta-pages", "truncated"])
def test_damaged_metadata_is_refused_and_repair_restores_the_backup(make_mount, how):
    m = make_mount(block_size="64K")
    for n in ("a", "b"):
        write(m.p(n), content(n, 100 * KiB))
    m.umount()  # a clean unmount backs the metadata up
    m.mount()
    write(m.p("c"), content("c", 100 * KiB))
    os.unlink(m.p("a"))
    dfd = os.open(m.path, os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(dfd)  # a checkpoint: a's extents may be reused from now on
    os.close(dfd)
    write(m.p("d"), content("d", 100 * KiB), fsync=True)  # takes a's extents (best fit)
    m.kill9()
    meta_dir = os.path.join(m.warehouse, "meta")
    _damage(meta_dir, how)
    res = run_kvfs("mount", m.warehouse, m.path, check=False)
    assert res.returncode == 10, res
    assert "metadata is damaged" in res.stderr and "kvfs fsck" in res.stderr and "Traceback" not in res.stderr
    res = run_kvfs("fsck", m.warehouse, check=False)
    assert res.returncode == 10 and "--repair restores" in res.stderr and "Traceback" not in res.stderr, res
    code, report = fsck(m.warehouse, "--repair", check=False)
    assert code == 0 and report["restored"]["backup"] == "meta.backup", report
    assert os.path.isdir(report["restored"]["damaged_copy"])  # kept for a post-mortem
    fsck(m.warehouse)
    m.mount()
    # The backup's view: a and b. Whatever of a's blocks a later write reused was found by
    # the verification and a dropped; b is intact; c and d came after the backup.
    names = sorted(os.listdir(m.path))
    assert names == ["b"], names  # a's blocks hold d's bytes now: found, and a dropped
    assert report["stats"]["dropped_files"] == 1, report
    assert read(m.p("b")) == content("b", 100 * KiB)
    write(m.p("e"), content("e"))
    assert read(m.p("e")) == content("e")


def test_corruption_sweep_detects_every_damaged_file(tmp_path):
    """scripts/corruption.py: one bit flipped in each of 20 random stored blocks; every file
    holding one is refused with EIO and dropped, every other reads back, fsck is clean."""
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "corruption.py")
    res = subprocess.run([sys.executable, script, "--flips", "20", "--files", "100", "--json",
                          "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    summary = json.loads(res.stdout)
    assert res.returncode == 0, (summary, res.stderr[-2000:])
    assert summary["files_with_damage"] >= 10 and summary["refused_with_eio"] == summary["files_with_damage"]
    assert summary["wrong_bytes"] == [] and summary["damage_not_detected"] == [] and summary["fsck_clean"]
