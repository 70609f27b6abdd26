"""Fixtures that make and mount real warehouses.

Every FUSE test mounts for real through the `kvfs` command (a daemon in its own session)
and always unmounts in `finally`: fusermount3 -u -z, then terminate, then kill. When FUSE
cannot be used the tests fail (they never skip): CI must prove the mount works.
"""

import os
import signal
import subprocess
import sys
import time

import pytest

from kvfs.tools.main import main as kvfs_main
from kvfs.mounttab import abort_connection, daemon_pid, find_mount, pid_alive  # noqa: F401 (tests import them from here)

KVFS = [sys.executable, "-m", "kvfs.tools"]


def wait_for(cond, timeout=15.0):
    """Poll `cond` until it is true or `timeout` seconds pass; return its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def run_kvfs(*args, check=True, timeout=120):
    """Run the real kvfs command in a subprocess; return CompletedProcess."""
    res = subprocess.run([*KVFS, *map(str, args)], capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"kvfs {' '.join(map(str, args))} -> {res.returncode}\n{res.stdout}\n{res.stderr}")
    return res


class Mount:
    def __init__(self, warehouse, mountpoint, options=()):
        self.warehouse = str(warehouse)
        self.path = str(mountpoint)
        self.options = list(options)
        self.pid = None

    def mount(self, *extra):
        args = ["mount", self.warehouse, self.path]
        for o in self.options:
            args += ["-o", o]
        res = run_kvfs(*args, *extra)
        self.pid = daemon_pid(self.warehouse)
        assert self.pid and pid_alive(self.pid), "daemon not running after kvfs mount"
        return res

    def umount(self):
        res = run_kvfs("umount", self.path)
        assert not pid_alive(self.pid), "daemon still running after kvfs umount"
        return res

    def remount(self):
        self.umount()
        self.mount()

    def kill9(self):
        os.kill(self.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while pid_alive(self.pid) and time.monotonic() < deadline:
            time.sleep(0.02)

    def p(self, *parts):
        return os.path.join(self.path, *parts)

    def cleanup(self):
        entry = find_mount(self.path, resolve=False)
        if entry is not None:
            if self.pid and not pid_alive(self.pid):
                abort_connection(entry)  # a killed daemon may leave clients (and itself) waiting
            subprocess.run(["fusermount3", "-u", "-z", self.path], capture_output=True)
        pid = self.pid
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if pid and pid != os.getpid() and pid_alive(pid):
                os.kill(pid, sig)
                deadline = time.monotonic() + 5
                while pid_alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.05)


@pytest.fixture
def make_warehouse(tmp_path):
    """mkfs a warehouse under tmp_path; returns its path."""
    def make(name="wh", devices=(("a.img", "256M"), ("b.img", "256M")), block_size="1M", extra=()):
        wh = tmp_path / name
        args = ["mkfs", str(wh), "--block-size", block_size, *extra]
        for path, size in devices:
            args += ["--device", f"{path}:{size}"]
        assert kvfs_main(args) == 0
        return wh
    return make


@pytest.fixture
def make_mount(tmp_path, make_warehouse):
    """Factory of real mounts; every one is unmounted (and its daemon killed) at teardown."""
    if not os.path.exists("/dev/fuse"):
        pytest.fail("/dev/fuse is missing: FUSE tests cannot run on this machine")
    mounts = []

    def make(name="wh", options=(), **kw):
        wh = make_warehouse(name, **kw)
        mp = tmp_path / f"mnt-{name}"
        mp.mkdir()
        m = Mount(wh, mp, options)
        mounts.append(m)
        m.mount()
        return m

    yield make
    for m in mounts:
        m.cleanup()


@pytest.fixture
def mnt(make_mount):
    """A mounted two-device warehouse with 1 MiB blocks."""
    return make_mount()


@pytest.fixture
def public_mount(make_warehouse):
    """A mount that other users can reach: allow_other, on a mount point outside pytest's
    0700 temporary directory."""
    import shutil
    import tempfile

    mp = tempfile.mkdtemp(prefix="kvfs-public-", dir="/tmp")
    os.chmod(mp, 0o755)
    m = Mount(make_warehouse(), mp, ["allow_other"])
    try:
        m.mount()
        yield m
    finally:
        m.cleanup()
        shutil.rmtree(mp, ignore_errors=True)

