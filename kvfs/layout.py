"""A warehouse directory on disk: the names of what it holds, its lock, its default size.

Owns: the file and directory names inside a warehouse (metadata, backups, lock, log, the
default device) and the exclusive lock one process (a mount, fsck) takes. Touches no
metadata and no device: kvfs.warehouse, kvfs.fsck, kvfs.mount and the tools build on it.
"""

import fcntl
import os

from .errors import QuietError, EXIT_IN_USE

META_DIR = "meta"
POWER_CUT_DIR = "meta.power-cut"  # fault drills only: the metadata a power cut would leave
BACKUP_DIRS = ("meta.backup", "meta.backup.1")  # copies of the metadata, newest first
BACKUP_INTERVAL = 600.0  # seconds between metadata backups of a mounted warehouse
LOCK_FILE = "lock"
LOG_FILE = "kvfs.log"
DEFAULT_DEVICE = "data0.img"


def take_lock(path: str) -> int:
    """Take the warehouse's exclusive lock; one process (a mount, fsck) at a time."""
    fd = os.open(os.path.join(path, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        finally:
            os.close(fd)
        raise QuietError(f"{path} is in use ({holder or 'locked by another process'})", EXIT_IN_USE) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
    return fd


def lock_holder(path: str) -> int | None:
    """Pid of the process holding (or last holding) the warehouse lock, as take_lock wrote it."""
    try:
        with open(os.path.join(path, LOCK_FILE)) as f:
            word, _, pid = f.read().strip().partition(" ")
        return int(pid) if word == "pid" else None
    except (OSError, ValueError):
        return None


def default_size(path: str) -> int:
    """Size of the default file-backed device: 4 GiB, at most half the free space."""
    st = os.statvfs(path)
    half_free = st.f_bavail * st.f_frsize // 2
    return max(64 << 20, min(4 << 30, half_free)) // (1 << 20) * (1 << 20)
