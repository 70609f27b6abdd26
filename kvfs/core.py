"""What every layer of an open warehouse shares: its metadata, its devices, the one lock.

Owns: the handles of an open warehouse (kvfs.meta.Meta, kvfs.store.DeviceSet), the lock
that orders every change (an RLock: a layer may call another while holding it), the
counters, the table of open files, the access times not yet written, and the two
announcements the layers make upward (names removed by the warehouse itself, files
published). It decides nothing; kvfs.warehouse makes it and hands it to each layer.

Lock order: Core.lock before a layer's own lock (kvfs.blockcache's) and before the device
set's; no layer holds its own lock while it takes Core.lock.
"""

import collections
import logging
import threading
import time

from .errors import ReadOnly

log = logging.getLogger("kvfs.warehouse")


def now_ns() -> int:
    return time.time_ns()


class Core:
    """The shared state of an open warehouse (see the module docstring)."""

    def __init__(self, path: str, sb: dict, meta, devices, readonly: bool, durability: str):
        self.path = path
        self.sb = sb  # the superblock as last written (watermarks and format change it)
        self.block_size: int = sb["block_size"]
        self.meta = meta
        self.devices = devices
        self.readonly = readonly
        self.durability = durability
        self.lock = threading.RLock()
        self.counters = collections.Counter()  # since this open; Warehouse.stats adds the past
        # ino -> kvfs.files.OpenFile: regular files with open handles or unpublished changes.
        self.open: dict = {}
        self.accessed: dict[int, int] = {}  # ino -> ns: access times not yet written
        self.opens: dict[int, int] = collections.Counter()  # ino -> opens not yet counted
        # Set when use passes the high watermark: the mount daemon's evictor waits on it.
        self.pressure = threading.Event()
        # Called (outside any lock) with [(parent, name, ino)] of names that the warehouse
        # removed by itself (eviction, expiry, retire, quarantine): the FUSE layer tells
        # the kernel.
        self.on_removed = None
        # Called with an inode that was published here (committed, renamed, annotated),
        # with or without the lock held: the shared tier queues it for upload.
        self.on_published = None

    def check_writable(self) -> None:
        if self.readonly:
            raise ReadOnly("read-only mount")

    def notify_removed(self, removed: list) -> None:
        if removed and self.on_removed is not None:
            try:
                self.on_removed(removed)
            except Exception:
                log.exception("telling the kernel about %d removed names failed", len(removed))

    def published(self, ino: int) -> None:
        if self.on_published is not None:
            self.on_published(ino)


class Layer:
    """A layer of an open warehouse: the parts of its Core every layer works with, at hand."""

    def __init__(self, core: Core):
        self.core = core
        self.meta = core.meta
        self.devices = core.devices
        self.counters = core.counters
        self.block_size = core.block_size
