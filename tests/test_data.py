"""Data path through a real mount: persistence, striping, dedup, big directories, fio."""

import hashlib
import mmap
import os
import random
import shutil
import subprocess

import pytest

from conftest import run_kvfs


def _pattern(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _write_plain(path, data):
    with open(path, "wb") as f:
        f.write(data)


def _write_direct(path, data):
    # O_DIRECT with an aligned buffer, plus an unaligned tail as vLLM-sized files have.
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_DIRECT, 0o644)
    try:
        aligned = len(data) // 4096 * 4096
        if aligned:
            buf = mmap.mmap(-1, aligned)
            buf.write(data[:aligned])
            assert os.write(fd, buf) == aligned
        if aligned < len(data):
            assert os.pwrite(fd, data[aligned:], aligned) == len(data) - aligned
    finally:
        os.close(fd)


def _write_tmp_rename(path, data):
    tmp = f"{path}_{random.getrandbits(32):08x}.tmp"
    _write_direct(tmp, data)
    os.replace(tmp, path)


def test_300mib_of_random_files_survive_remount(mnt):
    """Files of 1 byte to 48 MiB, three write styles, two devices, byte-identical after remount."""
    rng = random.Random(2)
    sizes = [1, 4095, 4096, 4097, (1 << 20) - 1, 1 << 20, (1 << 20) + 1, 48 << 20]
    total = sum(sizes)
    while total < 300 << 20:
        s = rng.choice([rng.randint(1, 64 << 10), rng.randint(1, 4 << 20), rng.randint(1, 48 << 20)])
        s = min(s, (300 << 20) - total + 1)
        sizes.append(s)
        total += s
    writers = [_write_plain, _write_direct, _write_tmp_rename]
    os.mkdir(mnt.p("kv"))
    expect = {}
    for i, size in enumerate(sizes):
        name = f"kv/{i:04d}.bin"
        data = _pattern(i, size)
        writers[i % 3](mnt.p(name), data)
        expect[name] = hashlib.sha256(data).hexdigest()
    assert total >= 300 << 20
    mnt.remount()
    assert sorted(os.listdir(mnt.p("kv"))) == sorted(n.split("/")[1] for n in expect)
    for name, digest in expect.items():
        with open(mnt.p(name), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == digest, name
    st = os.statvfs(mnt.path)
    mnt.umount()
    res = run_kvfs("fsck", mnt.warehouse, "--verify-data", "--json")
    import json

    report = json.loads(res.stdout)
    assert report["clean"], report["problems"]
    assert report["stats"]["verified_blocks"] >= 300
    assert st.f_blocks > st.f_bfree


def test_striping_uses_every_device(mnt):
    with open(mnt.p("f"), "wb") as f:
        f.write(os.urandom(16 << 20))
    mnt.umount()
    from kvfs.warehouse import Warehouse

    wh = Warehouse(mnt.warehouse)
    try:
        per_dev = [d["size"] - d["free"] for d in wh.statfs()["devices"]]
    finally:
        wh.close()
    assert per_dev[0] == per_dev[1] == 8 << 20


def test_20000_entries_in_one_directory(mnt):
    d = mnt.p("many")
    os.mkdir(d)
    n = 20000
    for i in range(n):
        os.close(os.open(os.path.join(d, f"{i:06x}.bin"), os.O_CREAT | os.O_WRONLY, 0o644))
    # Drop the kernel's dentry cache so lookups reach the daemon.
    subprocess.run(["sh", "-c", "echo 2 > /proc/sys/vm/drop_caches"], check=False)
    for i in range(0, n, 7):
        assert os.path.exists(os.path.join(d, f"{i:06x}.bin"))
    assert not os.path.exists(os.path.join(d, "ffffff.bin"))
    names = os.listdir(d)
    assert len(names) == n
    assert len(set(names)) == n


def test_same_64mib_under_two_names_costs_64mib(mnt):
    before = os.statvfs(mnt.path)
    data = os.urandom(64 << 20)
    _write_plain(mnt.p("one"), data)
    _write_direct(mnt.p("two"), data)
    after = os.statvfs(mnt.path)
    used = (before.f_bfree - after.f_bfree) * after.f_frsize
    assert 64 << 20 <= used <= (64 << 20) + (1 << 20), used
    assert open(mnt.p("two"), "rb").read() == data
    os.unlink(mnt.p("one"))
    assert open(mnt.p("two"), "rb").read() == data


def test_corrupt_block_is_eio_never_wrong_bytes(mnt):
    data = b"K" * (1 << 20) + b"V" * (1 << 20)
    _write_plain(mnt.p("f"), data)
    mnt.umount()
    # Flip one byte inside every data extent of both devices.
    for dev in ("a.img", "b.img"):
        path = os.path.join(mnt.warehouse, dev)
        with open(path, "r+b") as f:
            f.seek((1 << 20) + 100)
            b = f.read(1)
            f.seek((1 << 20) + 100)
            f.write(bytes([b[0] ^ 0xFF]))
    mnt.mount()
    with pytest.raises(OSError) as info:
        with open(mnt.p("f"), "rb") as f:
            f.read()
    assert info.value.errno == 5  # EIO
    with open(os.path.join(mnt.warehouse, "kvfs.log")) as f:
        assert "failed verification" in f.read()
    assert not os.path.exists(mnt.p("f"))  # dropped: never served again (tests/test_faults.py)
    mnt.umount()
    res = run_kvfs("fsck", mnt.warehouse, "--verify-data", check=False)
    assert res.returncode == 0, res.stdout  # its blocks, both damaged, went with it


def test_fio_verify_through_the_mount(mnt, tmp_path):
    assert shutil.which("fio"), "fio is missing: scripts/setup.sh installs it"
    cmd = [
        "fio", "--name=verifyjob", f"--directory={mnt.path}", "--size=48M", "--bs=128k",
        "--rw=randwrite", "--verify=crc32c", "--do_verify=1", "--ioengine=psync",
        "--numjobs=2", "--group_reporting", "--direct=1", "--output-format=terse",
    ]
    # cwd in tmp: fio writes verify state files there, and names files after the job.
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert sorted(os.listdir(mnt.path)) == ["verifyjob.0.0", "verifyjob.1.0"]
    assert res.returncode == 0, res.stdout + res.stderr
    assert "verify" not in res.stderr.lower(), res.stderr
