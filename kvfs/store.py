"""Backing devices: their headers, extent I/O, and the in-memory extent allocator.

A device is a block device or a preallocated file. Its first DATA_START bytes hold a header
naming the warehouse (uuid) and the device's index, so a mount never writes to the wrong
disk. Extents are allocated in ALLOC_UNIT units from the data area.

Allocation follows the 3FS order: an extent is taken from the in-memory FreeMap first, data
is written, and only then does the metadata transaction that references it also remove it
from the persistent free map (kvfs.meta). A crash before that commit leaves the extent free
on disk: nothing leaks and nothing points at garbage. Freed extents come back to the
in-memory map only after reads that might still be using them have finished.
"""

import errno
import fcntl
import logging
import os
import stat
import struct
import threading
import time
import uuid as uuidlib

from sortedcontainers import SortedDict, SortedList

from .errors import Corrupt, KvfsError, QuietError, EXIT_DEVICE, EXIT_USAGE

ALLOC_UNIT = 4096
DATA_START = 1 << 20  # header area; also keeps data extents 1 MiB-aligned at the start
_MAGIC = b"KVFSDEV1"
_HEADER = struct.Struct(">8s16sHQ")  # magic, warehouse uuid, device index, size
BLKGETSIZE64 = 0x80081272

log = logging.getLogger("kvfs.store")


def round_up(n: int, unit: int = ALLOC_UNIT) -> int:
    return (n + unit - 1) // unit * unit


def device_size(path: str) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        if stat.S_ISBLK(os.fstat(fd).st_mode):
            buf = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
            return struct.unpack("Q", buf)[0]
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def _big_enough(path: str, size: int) -> int:
    if size < DATA_START + 16 * ALLOC_UNIT:
        raise QuietError(f"{path}: device too small ({size} bytes; need at least 2 MiB)", EXIT_DEVICE)
    return size


def prepare_device(path: str, size: int | None, wh_uuid: str, index: int, force: bool) -> int:
    """Create (files) or claim (block devices) a device and write its header.

    Returns the usable size in bytes. Raises QuietError with a one-line reason."""
    exists = os.path.exists(path)
    is_blk = exists and stat.S_ISBLK(os.stat(path).st_mode)
    if exists and not is_blk and not force and size is not None:
        raise QuietError(f"{path}: file exists (use --force to reuse it)", EXIT_DEVICE)
    if not is_blk:
        if size is None:
            if not exists:
                raise QuietError(f"{path}: no such device; give a size (PATH:SIZE) to create a file", EXIT_DEVICE)
            size = os.stat(path).st_size
        _big_enough(path, size)  # before the file is made or emptied
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, 0)
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    os.close(fd)
                    fd = -1
                    os.unlink(path)
                    raise QuietError(f"{path}: cannot allocate {size} bytes: {exc.strerror}", EXIT_DEVICE) from None
                os.ftruncate(fd, size)  # filesystem without fallocate: sparse file
        finally:
            if fd >= 0:
                os.close(fd)
    else:
        size = _big_enough(path, device_size(path))
    size = size // ALLOC_UNIT * ALLOC_UNIT
    fd = os.open(path, os.O_RDWR)
    try:
        header = _HEADER.pack(_MAGIC, uuidlib.UUID(wh_uuid).bytes, index, size)
        os.pwrite(fd, header.ljust(ALLOC_UNIT, b"\0"), 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    return size


class Faults:
    """Injected device faults, for tests and failure drills; off unless the daemon's
    environment has KVFS_FAULTS (a JSON object, "{}" for none yet). Never on by accident:
    production mounts do not read this variable's absence as anything.

        {"rules": [{"op": "read"|"write"|"sync", "device": 0, "errno": "EIO",
                    "after": 0, "count": null, "offset": [lo, hi], "delay": 0}],
         "volatile": true}

    A rule fails matching calls (op, device if given, extents touching [lo, hi) if given)
    with its errno, after letting `after` of them through, `count` times (null: always).
    A rule with "delay": SECONDS instead makes each matching call that long (a slow or
    stalling drive), and then lets it through.
    A sync rule with "lie": true instead reports success without syncing: a drive that
    acknowledges flushes it did not do (with `volatile`, those writes die at a crash).
    `volatile` keeps every device write in memory until the device is synced, as a drive's
    volatile write cache does: a killed daemon loses exactly the writes made since the
    last sync (fdatasync), which is what a power cut does to a drive without power-loss
    protection. Rules can be replaced at run time through the control file ("faults")."""

    ENV = "KVFS_FAULTS"

    def __init__(self, spec: dict | None = None):
        spec = spec or {}
        self.volatile = bool(spec.get("volatile", False))
        self.lock = threading.Lock()
        self.set_rules(spec.get("rules", []))

    @classmethod
    def from_env(cls) -> "Faults | None":
        import json

        raw = os.environ.get(cls.ENV)
        if raw is None:
            return None
        try:
            spec = json.loads(raw or "{}")
            faults = cls(spec)
        except (ValueError, TypeError, KeyError) as exc:
            raise QuietError(f"{cls.ENV} is not a valid fault specification: {exc}", EXIT_USAGE) from None
        return faults

    def set_rules(self, rules: list) -> None:
        checked = []
        for r in rules:
            if not isinstance(r, dict) or r.get("op") not in ("read", "write", "sync"):
                raise ValueError(f"a fault rule needs op read, write or sync: {r!r}")
            err = r.get("errno", "EIO")
            code = getattr(errno, err, None) if isinstance(err, str) else err
            if not isinstance(code, int) or isinstance(code, bool) or code <= 0:
                raise ValueError(f"unknown errno {err!r}")
            lo, hi = r.get("offset") or (0, 1 << 63)
            delay = float(r.get("delay", 0))
            if not 0 <= delay <= 3600:
                raise ValueError(f"a fault's delay is 0 to 3600 seconds: {r!r}")
            checked.append({"op": r["op"], "device": r.get("device"), "errno": code, "lie": bool(r.get("lie")),
                            "after": int(r.get("after", 0)), "count": r.get("count"),
                            "offset": (int(lo), int(hi)), "delay": delay, "fired": 0, "seen": 0})
        with self.lock:
            self.rules = checked

    def describe(self) -> dict:
        with self.lock:
            return {"volatile": self.volatile,
                    "rules": [{**r, "errno": errno.errorcode.get(r["errno"], r["errno"]),
                               "offset": list(r["offset"])} for r in self.rules]}

    def check(self, op: str, device: int, offset: int = 0, length: int = 0) -> bool:
        """Raise the OSError a rule injects; True if a rule says to lie (skip the work).
        A delay rule's wait happens here, outside the rules' lock."""
        delay = 0.0
        with self.lock:
            for r in self.rules:
                if r["op"] != op or r["device"] not in (None, device):
                    continue
                lo, hi = r["offset"]
                if op != "sync" and (offset + length <= lo or offset >= hi):
                    continue
                r["seen"] += 1
                if r["seen"] <= r["after"] or (r["count"] is not None and r["fired"] >= r["count"]):
                    continue
                r["fired"] += 1
                if r["delay"]:
                    delay += r["delay"]
                    continue
                if r["lie"]:
                    return True
                raise OSError(r["errno"], f"{os.strerror(r['errno'])} (injected)")
        if delay:
            time.sleep(delay)
        return False


class Device:
    """One open backing device."""

    def __init__(self, index: int, path: str, size: int, wh_uuid: str, readonly: bool = False):
        self.index = index
        self.path = path
        self.size = size
        self.dfd: int | None = None  # opened O_DIRECT, for the direct path (_odirect_fd)
        self._dfd_lock = threading.Lock()
        self._retired: list[int] = []
        flags = os.O_RDONLY if readonly else os.O_RDWR
        try:
            self.fd = os.open(path, flags | os.O_CLOEXEC)
        except OSError as exc:
            raise QuietError(f"device {index} ({path}): {exc.strerror}", EXIT_DEVICE) from None
        raw = os.pread(self.fd, _HEADER.size, 0)
        if len(raw) < _HEADER.size:
            self.close()
            raise QuietError(f"device {index} ({path}): too short to hold a kvfs header", EXIT_DEVICE)
        magic, dev_uuid, dev_index, dev_size = _HEADER.unpack(raw)
        if magic != _MAGIC or uuidlib.UUID(bytes=dev_uuid) != uuidlib.UUID(wh_uuid) or dev_index != index:
            self.close()
            raise QuietError(
                f"device {index} ({path}) does not belong to this warehouse (header mismatch)",
                EXIT_DEVICE,
            )
        actual = device_size(path)
        if actual < size:
            self.close()
            raise QuietError(
                f"device {index} ({path}) is {actual} bytes, smaller than its recorded {size}",
                EXIT_DEVICE,
            )
        self.reads = self.writes = self.read_bytes = self.write_bytes = 0
        self.faults: Faults | None = None
        # Syncs run while writes go on (a checkpoint syncs the devices first without the
        # warehouse lock): a sync covers the writes counted when it starts, and the next
        # sync is needed only if more were made since (_state guards these and _unsynced).
        self._state = threading.Lock()
        self._written = 0  # writes made (pwrite calls that returned)
        self._synced = 0  # of them, those a successful sync covers
        self._unsynced: dict[int, bytes] = {}  # offset -> bytes: a volatile write cache (Faults)
        self.sync_error: str | None = None  # set by a failed sync: every later one fails too

    def pread(self, length: int, offset: int) -> bytes:
        try:
            unsynced = None
            if self.faults is not None:
                self.faults.check("read", self.index, offset, length)
                # Taken before the file is read: a sync that writes the cache out and
                # clears it meanwhile has then written the file first.
                with self._state:
                    unsynced = list(self._unsynced.items()) if self._unsynced else None
            data = os.pread(self.fd, length, offset)
            if unsynced:
                data = self._overlay(data, offset, unsynced)
        except OSError as exc:
            raise KvfsError(f"device {self.index} read at {offset}: {exc.strerror}", exc.errno) from None
        self.reads += 1
        self.read_bytes += len(data)
        if len(data) != length:
            raise Corrupt(f"device {self.index}: short read at {offset} ({len(data)} of {length})")
        return data

    def preadinto(self, views: list, offset: int, odirect: bool = False) -> None:
        """Read into `views` (memoryviews, filled in order) from `offset`: the direct path,
        straight into a client's memory (preadv drops the GIL). Corrupt on a short read.
        odirect: past the page cache (offset, lengths and memory 4 KiB-aligned; not under
        fault injection, whose volatile cache lives in memory)."""
        length = sum(len(v) for v in views)
        try:
            unsynced = None
            fd = self.fd
            if self.faults is not None:
                self.faults.check("read", self.index, offset, length)
                unsynced = list(self._unsynced.items()) if self._unsynced else None
            elif odirect:
                fd = self._odirect_fd()
            try:
                n = os.preadv(fd, views, offset) if length else 0
            except OSError as exc:
                if fd == self.fd or exc.errno != errno.EINVAL:
                    raise
                # The device took O_DIRECT at open but not this alignment: page cache from now on.
                log.warning("device %d (%s) refuses O_DIRECT reads (%s): reading through the page cache",
                            self.index, self.path, exc.strerror)
                with self._dfd_lock:
                    if self.dfd != self.fd:  # (closed with the device: another read may use it now)
                        self._retired.append(self.dfd)
                        self.dfd = self.fd
                n = os.preadv(self.fd, views, offset)
            if unsynced and n == length:
                data = self._overlay(b"".join(bytes(v) for v in views), offset, unsynced)
                pos = 0
                for v in views:
                    v[:] = data[pos:pos + len(v)]
                    pos += len(v)
        except OSError as exc:
            raise KvfsError(f"device {self.index} read at {offset}: {exc.strerror}", exc.errno) from None
        self.reads += 1
        self.read_bytes += n
        if n != length:
            raise Corrupt(f"device {self.index}: short read at {offset} ({n} of {length})")

    def _odirect_fd(self) -> int:
        """A second descriptor of the device, opened O_DIRECT (the plain one where the
        filesystem under a device file refuses O_DIRECT, as tmpfs does)."""
        with self._dfd_lock:
            if self.dfd is None:
                try:
                    self.dfd = os.open(self.path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
                except OSError:
                    self.dfd = self.fd
            return self.dfd

    def _overlay(self, data: bytes, offset: int, unsynced: list) -> bytes:
        """What a read sees through the volatile write cache (writes not yet synced)."""
        buf = None
        end = offset + len(data)
        for woff, wdata in unsynced:
            lo, hi = max(offset, woff), min(end, woff + len(wdata))
            if lo < hi:
                buf = buf if buf is not None else bytearray(data)
                buf[lo - offset:hi - offset] = wdata[lo - woff:hi - woff]
        return data if buf is None else bytes(buf)

    def pwrite(self, data, offset: int) -> None:
        if offset < DATA_START or offset + len(data) > self.size:
            raise Corrupt(f"device {self.index}: write outside the data area at {offset}")
        try:
            if self.faults is not None:
                self.faults.check("write", self.index, offset, len(data))
            if self.faults is not None and self.faults.volatile:
                end = offset + len(data)
                with self._state:
                    for woff in [o for o, d in self._unsynced.items() if o < end and offset < o + len(d)]:
                        del self._unsynced[woff]  # (overlap only when a never-published extent is reused)
                    self._unsynced[offset] = bytes(data)
                n = len(data)
            else:
                n = os.pwrite(self.fd, data, offset)
        except OSError as exc:
            raise KvfsError(f"device {self.index} write at {offset}: {exc.strerror}", exc.errno) from None
        if n != len(data):
            raise KvfsError(f"device {self.index}: short write at {offset}", errno.EIO)
        with self._state:
            self._written += 1
        self.writes += 1
        self.write_bytes += n

    def sync(self) -> None:
        """Make this device's writes durable (KvfsError if the device fails).

        A failed sync is sticky: after an fdatasync error the kernel may have dropped the
        dirty pages and a retry would report success for writes that are lost (the
        "fsyncgate" lesson), so every later sync fails too until the warehouse is opened
        again (and fsck --verify-data says what survived)."""
        if self.sync_error is not None:
            raise KvfsError(f"device {self.index}: an earlier sync failed ({self.sync_error}); what was "
                            "written since the last good sync may be lost: unmount, check the device, "
                            "kvfs fsck --verify-data", errno.EIO)
        with self._state:
            upto = self._written
            if upto == self._synced or self.fd < 0:
                return
            pending = sorted(self._unsynced.items())
        try:
            if self.faults is not None and self.faults.check("sync", self.index):
                pending = None  # a lying drive: nothing is written out
            else:
                for woff, wdata in pending:
                    os.pwrite(self.fd, wdata, woff)
                os.fdatasync(self.fd)
        except OSError as exc:
            self.sync_error = exc.strerror
            raise KvfsError(f"device {self.index} sync: {exc.strerror}", exc.errno) from None
        with self._state:
            for woff, wdata in pending or ():  # (a write of the same offset since stays)
                if self._unsynced.get(woff) is wdata:
                    del self._unsynced[woff]
            self._synced = max(self._synced, upto)

    def close(self) -> None:
        if self.dfd is not None and self.dfd != self.fd:
            os.close(self.dfd)
        for fd in self._retired:
            os.close(fd)
        self._retired, self.dfd = [], None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class FreeMap:
    """In-memory free extents of one device: best fit by size, coalescing by offset."""

    def __init__(self):
        self.by_off = SortedDict()
        self.by_size = SortedList()
        self.free_bytes = 0

    def add(self, offset: int, length: int) -> None:
        end = offset + length
        i = self.by_off.bisect_left(offset)
        if i < len(self.by_off):
            noff = self.by_off.keys()[i]
            if noff < end:
                raise Corrupt(f"allocator: double free at {offset}")
            if noff == end:
                nlen = self.by_off.pop(noff)
                self.by_size.remove((nlen, noff))
                end += nlen
        if i > 0:
            poff = self.by_off.keys()[i - 1]
            plen = self.by_off[poff]
            if poff + plen > offset:
                raise Corrupt(f"allocator: double free at {offset}")
            if poff + plen == offset:
                del self.by_off[poff]
                self.by_size.remove((plen, poff))
                offset = poff
        self.by_off[offset] = end - offset
        self.by_size.add((end - offset, offset))
        self.free_bytes += length

    def take(self, length: int) -> int | None:
        """Allocate `length` bytes (a multiple of ALLOC_UNIT); None if no extent fits."""
        i = self.by_size.bisect_left((length, -1))
        if i == len(self.by_size):
            return None
        flen, foff = self.by_size.pop(i)
        del self.by_off[foff]
        if flen > length:
            self.by_off[foff + length] = flen - length
            self.by_size.add((flen - length, foff + length))
        self.free_bytes -= length
        return foff


class DeviceSet:
    """All devices of a warehouse with their allocators; thread-safe allocation."""

    def __init__(self, devices: list[Device], faults: Faults | None = None):
        self.devices = devices
        self.faults = faults
        for d in devices:
            d.faults = faults
        self.free = [FreeMap() for _ in devices]
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()  # one sync at a time, and none across a close
        self._readers_done = threading.Condition(self._lock)
        # Freed extents wait here until no read that started before the free is running.
        self._generation = 0
        self._readers: dict[int, int] = {}
        # (generation, checkpoint, dev, off, len): a committed free is reused only after the
        # next checkpoint made it durable, or a power cut could revert the metadata to
        # point at an overwritten extent.
        self._deferred: list[tuple[int, int, int, int, int]] = []
        self.deferred_bytes = 0
        self._checkpoints = 0
        self.capacity = sum(d.size - DATA_START for d in devices)

    @property
    def free_bytes(self) -> int:
        """Free now or once pending frees are reusable: what statfs and watermarks count."""
        return sum(f.free_bytes for f in self.free) + self.deferred_bytes

    @property
    def used_bytes(self) -> int:
        return self.capacity - self.free_bytes

    def wait_readers(self, timeout: float) -> bool:
        """Wait until frees held back only by running reads are reusable; False if none
        are held back by reads, or the wait timed out."""
        with self._lock:
            if not any(ckpt < self._checkpoints for _, ckpt, *_ in self._deferred):
                return False
            before = self.deferred_bytes
            self._readers_done.wait_for(lambda: self.deferred_bytes < before, timeout)
            return self.deferred_bytes < before

    def allocate(self, length: int, prefer: int) -> tuple[int, int] | None:
        length = round_up(length)
        n = len(self.devices)
        with self._lock:
            self._reclaim_locked()
            for k in range(n):
                dev = (prefer + k) % n
                off = self.free[dev].take(length)
                if off is not None:
                    return dev, off
        return None

    def release(self, dev: int, offset: int, length: int, durable: bool = True) -> None:
        """Give an extent back once current readers are done with it (and, for a free that
        metadata recorded, once that is durable; durable=False for never-published ones)."""
        with self._lock:
            ckpt = self._checkpoints if durable else -1
            self._deferred.append((self._generation, ckpt, dev, offset, round_up(length)))
            self.deferred_bytes += round_up(length)
            self._generation += 1
            if not durable:
                # Only this extent can have become free: a recorded free waits for a
                # checkpoint (checkpointed) and every free for older readers (read_end),
                # which reclaim then. (Scanning here made many frees quadratic.)
                self._reclaim_locked()

    def read_begin(self) -> int:
        with self._lock:
            gen = self._generation
            self._readers[gen] = self._readers.get(gen, 0) + 1
            return gen

    def read_end(self, gen: int) -> None:
        with self._lock:
            left = self._readers[gen] - 1
            if left:
                self._readers[gen] = left
            else:
                del self._readers[gen]
            self._reclaim_locked()

    def checkpointed(self) -> None:
        """Metadata is durable up to now: frees recorded so far may be reused."""
        with self._lock:
            self._checkpoints += 1
            self._reclaim_locked()

    def _reclaim_locked(self) -> None:
        oldest = min(self._readers) if self._readers else None
        keep = []
        for item in self._deferred:
            gen, ckpt, dev, off, length = item
            if (oldest is None or gen < oldest) and ckpt < self._checkpoints:
                self.free[dev].add(off, length)
                self.deferred_bytes -= length
            else:
                keep.append(item)
        if len(keep) != len(self._deferred):
            self._deferred = keep
            self._readers_done.notify_all()

    def sync(self) -> None:
        """Make every device's writes so far durable. Safe to call while writes go on and
        from several threads (syncs run one at a time); it does nothing once closed."""
        with self._sync_lock:
            for d in self.devices:
                d.sync()

    def close(self) -> None:
        with self._sync_lock:  # (a sync in progress finishes first)
            for d in self.devices:
                d.close()
