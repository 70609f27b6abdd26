"""The mount table and the life of a mount seen from outside: which kvfs mounts exist
(/proc/self/mountinfo), whose daemon is alive, unmounting, and detaching a dead daemon's
mount. No pyfuse3 or trio here (kvfs.mount serves); used by the tools and the tests."""

import errno
import fcntl
import logging
import os
import re
import subprocess
import time

from .errors import QuietError, EXIT_MOUNT_FAILED, EXIT_NOT_MOUNTED
from .layout import LOCK_FILE, lock_holder


def _unescape(s: str) -> str:
    """mountinfo writes space, tab, newline and backslash as \\ooo octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def _mount_entries() -> list[dict]:
    """Every kvfs mount in /proc/self/mountinfo, most recent last."""
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        rfields = right.split()
        if len(fields) < 6 or len(rfields) < 2 or rfields[0] != "fuse.kvfs":
            continue
        out.append({"mountpoint": _unescape(fields[4]), "source": _unescape(rfields[1]),
                    "options": fields[5], "dev": fields[2]})
    return out


def kvfs_mounts() -> list[str]:
    return [e["mountpoint"] for e in _mount_entries()]


def find_mount(mountpoint: str, resolve: bool = True) -> dict | None:
    """The /proc/self/mountinfo entry of a kvfs mount at `mountpoint`, if any."""
    target = os.path.abspath(mountpoint)
    if resolve:
        try:
            target = os.path.realpath(mountpoint)
        except OSError:
            pass
    for entry in reversed(_mount_entries()):
        if entry["mountpoint"] == target:
            return entry
    return None


FUSECTL = "/sys/fs/fuse/connections"


def daemon_gone(warehouse: str) -> bool:
    """True if no live daemon serves `warehouse`: nobody holds its lock, or the holder is a
    zombie. (A daemon killed while one of its threads waits in the kernel, e.g. to
    invalidate a name in a directory that a client request has locked, stays a zombie that
    holds its files, /dev/fuse and the lock included, until its connection is aborted.)"""
    if wait_unlocked(warehouse, 0):
        return True
    pid = daemon_pid(warehouse)
    return pid is not None and not pid_alive(pid)


def abort_connection(entry: dict) -> bool:
    """Abort the FUSE connection of a mount whose daemon is gone (root only; the fusectl
    filesystem is mounted if it is not). Every request waiting on it fails with ENOTCONN,
    so clients and the dead daemon's last threads are let go. False if it could not."""
    minor = entry["dev"].partition(":")[2]
    path = os.path.join(FUSECTL, minor, "abort")
    if not os.path.exists(path) and os.path.isdir(FUSECTL):
        subprocess.run(["mount", "-t", "fusectl", "fusectl", FUSECTL], capture_output=True)
    try:
        with open(path, "w") as f:
            f.write("1")
    except OSError:
        return False
    logging.getLogger("kvfs").warning("aborted the FUSE connection of %s (its daemon is gone)", entry["mountpoint"])
    return True


def detach_dead(entry: dict, timeout: float = 10.0) -> None:
    """Let go of a mount whose daemon died: abort its connection, detach it lazily, and
    wait until the dead daemon's warehouse lock is free."""
    abort_connection(entry)
    fusermount_unmount(entry["mountpoint"], lazy=True)
    if not wait_unlocked(entry["source"], timeout):
        raise QuietError(f"{entry['source']} is still locked by the dead daemon of {entry['mountpoint']} "
                         f"(pid {daemon_pid(entry['source'])})", EXIT_MOUNT_FAILED)


def is_dead_mount(mountpoint: str) -> bool:
    try:
        os.stat(mountpoint)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


def fusermount_unmount(mountpoint: str, lazy: bool = False) -> None:
    cmd = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [mountpoint]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        err = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"exit {res.returncode}"
        raise QuietError(f"cannot unmount {mountpoint}: {err}", EXIT_MOUNT_FAILED)


def wait_unlocked(warehouse: str, timeout: float) -> bool:
    """Wait until no process holds the warehouse lock (the daemon has finished closing)."""
    path = os.path.join(warehouse, LOCK_FILE)
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            pass
        finally:
            os.close(fd)
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def unmount(mountpoint: str, lazy: bool = False, timeout: float = 120.0) -> tuple[str, bool]:
    """Unmount; return (warehouse, whether a daemon was serving it)."""
    info = find_mount(mountpoint)
    if info is None:
        raise QuietError(f"{mountpoint} is not a kvfs mount point", EXIT_NOT_MOUNTED)
    was_running = not wait_unlocked(info["source"], 0)
    pid = daemon_pid(info["source"]) if was_running else None
    if pid is not None and not pid_alive(pid):
        detach_dead(info)  # a zombie daemon: nothing would ever answer the unmount
        return info["source"], False
    fusermount_unmount(info["mountpoint"], lazy)
    deadline = time.monotonic() + timeout
    done = wait_unlocked(info["source"], timeout)
    while done and pid is not None and pid_alive(pid):
        if time.monotonic() > deadline:
            done = False
            break
        time.sleep(0.02)
    if not done:
        raise QuietError(
            f"unmounted {mountpoint}, but the daemon has not finished closing {info['source']} "
            f"after {timeout:.0f}s", EXIT_MOUNT_FAILED)
    return info["source"], was_running


daemon_pid = lock_holder  # the daemon is the process that holds the warehouse lock


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False
