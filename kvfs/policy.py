"""Cache policy: what stays and what goes. Pins, TTLs, quotas, watermarks, eviction,
retire and reap, and dropping a file found to hold a damaged block.

Owns: the pin flag and ttl of inodes (read and written as the user.kvfs.pin and
user.kvfs.ttl attributes), directory quotas (user.kvfs.quota) and the growth of open files
counted against them, the access times that order eviction, the watermarks, and the
allocation of extents (which evicts inline when the warehouse is full). It decides; the
namespace and the block store do (kvfs.namespace, kvfs.blocks). Runs under Core.lock.

Capacity: the warehouse is a cache. Above the high watermark the least recently used
unpinned files are evicted (names removed, data freed once nobody has them open) until use
is under the low watermark: in the background (evict_to_low_watermark, driven by the mount
daemon) and inline when a write finds no room. Access times are kept in memory and written
in batches at checkpoints; they are the eviction clock (the lru and expiry indexes of
kvfs.meta). Files under a directory with a ttl expire that long after their last access.
`kvfs retire` detaches a subtree at once and deletes it in short batches.
"""

import collections
import logging
import os
import stat
import time

from . import meta as M
from .core import Layer, now_ns
from .errors import Invalid, NoAttr, NoSpace, NotADirectory, NotFound, QuotaExceeded
from .namespace import check_xattr
from .store import round_up
from .units import parse_size

log = logging.getLogger("kvfs.warehouse")

DEFAULT_HIGH_WATERMARK = 0.90  # fractions of capacity: evict above high, down to low
DEFAULT_LOW_WATERMARK = 0.80
ACCESS_GRANULARITY_NS = 1_000_000_000  # an access time moves only if it moved this much
EVICT_BATCH = 128  # files removed per metadata transaction by eviction and expiry
INLINE_EVICT_BYTES = 32 << 20  # a writer that finds no room evicts at least this much
REAP_BATCH = 512  # entries deleted per transaction by retire
ALLOCATE_WAIT_S = 5.0  # how long a writer waits for reads that keep freed extents busy
PIN_XATTR = b"user.kvfs.pin"
TTL_XATTR = b"user.kvfs.ttl"
QUOTA_XATTR = b"user.kvfs.quota"
POLICY_XATTRS = (PIN_XATTR, TTL_XATTR, QUOTA_XATTR)  # kept in the inode or quotas, not as xattrs


def check_watermarks(high: float, low: float) -> None:
    if not (0 < low <= high <= 1):
        raise Invalid(f"watermarks must satisfy 0 < low <= high <= 1 (got high {high}, low {low})")


def _parse_flag(value: bytes) -> bool:
    v = value.strip().lower()
    if v in (b"1", b"true", b"yes", b"on"):
        return True
    if v in (b"", b"0", b"false", b"no", b"off"):
        return False
    raise Invalid(f"{PIN_XATTR.decode()} takes 1 or 0, not {value[:40]!r}")


def _parse_quota(value: bytes) -> int:
    try:
        limit = parse_size(value.decode())
    except (UnicodeDecodeError, ValueError):
        limit = -1
    if not 0 <= limit < 1 << 64:  # kept as an unsigned 64-bit number (kvfs.meta)
        raise Invalid(f"{QUOTA_XATTR.decode()} takes a size in bytes (e.g. 500G), not {value[:40]!r}")
    return limit


def _parse_ttl(value: bytes) -> int:
    try:
        ttl = int(value.strip() or b"0")
    except ValueError:
        ttl = -1
    if not 0 <= ttl < 1 << 32:
        raise Invalid(f"{TTL_XATTR.decode()} takes seconds (0 to 4294967295), not {value[:40]!r}")
    return ttl


class Policy(Layer):
    """The cache policy of an open warehouse (see the module docstring). `checkpoint`:
    makes what was freed durable, and so reusable (Warehouse.checkpoint)."""

    def __init__(self, core, namespace, blocks, checkpoint):
        super().__init__(core)
        self.namespace = namespace
        self.blocks = blocks
        self.checkpoint = checkpoint
        self.high_watermark = core.sb.get("high_watermark", DEFAULT_HIGH_WATERMARK)
        self.low_watermark = core.sb.get("low_watermark", DEFAULT_LOW_WATERMARK)
        # Quotas: bytes that open files have grown by and not committed, per quota directory.
        self._quota_pending: dict[int, int] = collections.Counter()
        self._quotas_exist = False  # writes check quotas only while some exist (load, set_quota)

    def load(self, txn) -> None:
        self._quotas_exist = self.meta.has_quotas(txn)

    # -- the policy attributes -------------------------------------------------------------
    #
    # user.kvfs.pin and user.kvfs.ttl are not stored as attributes: they read and write
    # the inode's pin flag and ttl, which the eviction indexes are derived from. Set on a
    # directory, they apply to everything below it, now and (inherited) later.

    def getxattr(self, ino: int, name: bytes) -> bytes:
        with self.meta.begin() as txn:
            inode = self.namespace.get_inode(txn, ino)
            if name == PIN_XATTR and inode.flags & M.F_PINNED:
                return b"1"
            if name == TTL_XATTR and inode.ttl:
                return str(inode.ttl).encode()
            quota = self.meta.get_quota(txn, ino) if name == QUOTA_XATTR else None
        if quota is not None:
            return str(quota[0]).encode()
        raise NoAttr(f"no attribute {name!r}")

    def setxattr(self, ino: int, name: bytes, value: bytes) -> int | None:
        """Set the pin, ttl or quota; for a pin or ttl, returns the inodes changed."""
        self.core.check_writable()
        check_xattr(name, value)
        if name == PIN_XATTR:
            return self.set_pin(ino, _parse_flag(value))
        if name == TTL_XATTR:
            return self.set_ttl(ino, _parse_ttl(value))
        return self.set_quota(ino, _parse_quota(value))

    def xattr_names(self, txn, inode: M.Inode) -> list[bytes]:
        """The policy attributes set on `inode`, as listxattr shows them."""
        quota = self.meta.get_quota(txn, inode.ino)
        return [name for name, present in ((PIN_XATTR, inode.flags & M.F_PINNED), (TTL_XATTR, inode.ttl),
                                           (QUOTA_XATTR, quota is not None)) if present]

    def removexattr(self, ino: int, name: bytes) -> int | None:
        self.core.check_writable()
        self.getxattr(ino, name)  # ENODATA when not set
        if name == QUOTA_XATTR:
            return self.set_quota(ino, None)
        return self.set_pin(ino, False) if name == PIN_XATTR else self.set_ttl(ino, 0)

    def set_pin(self, ino: int, pinned: bool) -> int:
        """Pin (never evict or expire) or unpin a file, or a directory and all below it.
        Returns the number of inodes changed."""
        def change(inode: M.Inode) -> bool:
            flags = inode.flags | M.F_PINNED if pinned else inode.flags & ~M.F_PINNED
            inode.flags, old = flags, inode.flags
            return flags != old
        return self._apply_to_tree(ino, change)

    def set_ttl(self, ino: int, ttl: int) -> int:
        """Make a file, or a directory and all below it, expire `ttl` seconds after the
        last access (0: never). Returns the number of inodes changed."""
        def change(inode: M.Inode) -> bool:
            inode.ttl, old = ttl, inode.ttl
            return ttl != old
        return self._apply_to_tree(ino, change)

    def _apply_to_tree(self, ino: int, change) -> int:
        """Apply change(inode) -> changed to `ino` and, for a directory, to every inode
        below it, REAP_BATCH entries per transaction with the lock let go in between (a
        big tree does not stall other clients). What is created meanwhile inherits from
        its directory, which is changed before its entries are visited."""
        self.core.check_writable()
        changed = 0
        with self.core.lock, self.meta.begin(write=True) as txn:
            inode = self.namespace.get_inode(txn, ino)
            if change(inode):
                inode.ctime_ns = now_ns()
                self.meta.put_inode(txn, inode)
                changed += 1
        stack = [(ino, 0)] if stat.S_ISDIR(inode.mode) else []  # (directory, last entry id)
        while stack:
            with self.core.lock, self.meta.begin(write=True) as txn:
                budget = REAP_BATCH
                while stack and budget:
                    d, last = stack[-1]
                    entry = next(self.meta.iter_prefix(txn, "dirents", M.ino_key(d), M.dirent_key(d, last + 1)), None)
                    if entry is None:
                        stack.pop()
                        continue
                    stack[-1] = (d, M.parse_dirent_key(entry[0])[1])
                    found = self.namespace.find(txn, d, entry[1])
                    child = None if found is None else self.meta.get_inode(txn, found[0])
                    budget -= 1
                    if child is None:
                        continue
                    if change(child):
                        self.meta.put_inode(txn, child)
                        changed += 1
                    if stat.S_ISDIR(child.mode):
                        stack.append((child.ino, 0))
        return changed

    # -- quotas ------------------------------------------------------------------------------

    def set_quota(self, ino: int, limit: int | None) -> None:
        """Limit what may be stored below directory `ino` to `limit` bytes of file sizes
        (None: no limit); growing past it fails with EDQUOT. Its usage is counted now."""
        self.core.check_writable()
        with self.core.lock, self.meta.begin(write=True) as txn:
            inode = self.namespace.get_inode(txn, ino)
            if not stat.S_ISDIR(inode.mode):
                raise NotADirectory("a quota is set on a directory")
            self.meta.set_quota(txn, ino, limit)
            self._quotas_exist = self.meta.has_quotas(txn)
            inode.ctime_ns = now_ns()
            self.meta.put_inode(txn, inode)
            for of in self.core.open.values():  # quota directories above open files may change
                if not of.pending:
                    of.quota_roots = None

    def charge(self, of, new_size: int) -> None:
        """Count open file `of` growing to `new_size` against the quotas above it,
        QuotaExceeded if that would pass one; a shrink gives back what was counted."""
        if not of.pending and not self._quotas_exist:
            return
        pending = max(0, new_size - of.base_size)
        delta = pending - of.pending
        if not delta:
            return
        with self.meta.begin() as txn:
            if of.quota_roots is None:
                of.quota_roots = sorted({r for parent, _ in self.meta.names_of(txn, of.ino)
                                         for r in self.meta.quota_roots(txn, parent)})
            for r in of.quota_roots if delta > 0 else ():
                limit, usage = self.meta.get_quota(txn, r) or (1 << 63, 0)
                if usage + self._quota_pending[r] + delta > limit:
                    self.counters["quota_refusals"] += 1
                    raise QuotaExceeded(f"quota of directory inode {r} ({limit} bytes) would be exceeded")
        for r in of.quota_roots:
            self._quota_pending[r] += delta
        of.pending = pending

    def settle_quota(self, of, committed_size: int) -> None:
        """The file's size is committed (or back to the committed one): its growth is in
        the quotas' usage now, not pending."""
        for r in of.quota_roots or ():
            self._quota_pending[r] -= of.pending
        of.pending = 0
        of.base_size = committed_size

    # -- access times -------------------------------------------------------------------------

    def flush_access(self) -> None:
        """Write the access times gathered since the last flush, in one transaction: the
        eviction order costs no metadata write per read."""
        core = self.core
        if core.readonly or not core.accessed:
            return
        with core.lock:
            accessed, core.accessed = core.accessed, {}
            opens, core.opens = core.opens, collections.Counter()
            with self.meta.begin(write=True) as txn:
                for ino, t in accessed.items():
                    inode = self.meta.get_inode(txn, ino)
                    if inode is None:
                        continue
                    if t - inode.atime_ns >= ACCESS_GRANULARITY_NS:
                        inode.atime_ns = t
                        self.meta.put_inode(txn, inode)
                    lineage = self.meta.get_lineage(txn, ino) if opens[ino] else None
                    if lineage is not None:
                        lineage.opens += opens[ino]
                        self.meta.put_lineage(txn, ino, lineage)

    # -- capacity --------------------------------------------------------------------------------

    def allocate(self, length: int, prefer: int) -> tuple[int, int]:
        """An extent for `length` bytes. A full warehouse makes room by evicting, inline;
        NoSpace only when all that is left is pinned or open."""
        loc = self.devices.allocate(length, prefer)
        deadline = time.monotonic() + ALLOCATE_WAIT_S
        while loc is None:
            # Freed extents are reusable once the free is durable (a checkpoint) and no
            # read that started before it still runs.
            self.checkpoint()
            loc = self.devices.allocate(length, prefer)
            if loc is not None:
                break
            files, _ = self.evict(max(length, INLINE_EVICT_BYTES), "evicted")
            if not files and not (time.monotonic() < deadline and self.devices.wait_readers(0.5)):
                free = self.devices.free_bytes
                if free >= round_up(length):
                    log.warning("no free extent of %d bytes although %d bytes are free: the free "
                                "space is fragmented between pinned or open files", length, free)
                    raise NoSpace(f"no free extent of {length} bytes: free space ({free} bytes) is "
                                  "fragmented between pinned or open files")
                raise NoSpace("warehouse is full: everything stored is pinned or open")
            loc = self.devices.allocate(length, prefer)
        if self.over_high_watermark():
            self.core.pressure.set()
        return loc

    def evict(self, want: int, reason: str, deadline_ns: int | None = None) -> tuple[int, int]:
        """Remove up to EVICT_BATCH files, least recently used first (with deadline_ns:
        files whose ttl ran out by then), until `want` bytes are freed. A file open for
        writing is skipped; one open for reading loses its name now and its data at the
        last close. Returns (files removed, bytes freed)."""
        if self.core.readonly:
            return 0, 0
        index = "lru" if deadline_ns is None else "expiry"
        effects: list = []
        removed: list = []
        files = freed = logical = 0
        with self.core.lock:
            self.flush_access()  # recent reads move files away from the front
            with self.meta.begin(write=True) as txn:
                victims = []
                for key, _ in txn.cursor(db=self.meta.db[index]):
                    t, ino = M.parse_time_key(key)
                    if deadline_ns is not None and t > deadline_ns:
                        break
                    of = self.core.open.get(ino)
                    if of is not None and of.busy():
                        continue
                    victims.append(ino)
                    if len(victims) >= EVICT_BATCH:
                        break
                for ino in victims:
                    if freed >= want:
                        break
                    before = len(effects)
                    logical += self.namespace.remove_names(txn, ino, effects, removed).size
                    files += 1
                    freed += sum(round_up(e[2]) for e in effects[before:])
            self.blocks.apply(effects)
            self.counters[f"{reason}_files"] += files
            self.counters[f"{reason}_bytes"] += logical
        if files:
            log.info("%s %d files (%d bytes stored, %d freed)", reason, files, logical, freed)
        self.core.notify_removed(removed)
        return files, freed

    def over_high_watermark(self) -> bool:
        return self.devices.used_bytes > self.high_watermark * self.devices.capacity

    def evict_to_low_watermark(self) -> tuple[int, int]:
        """Evict until use is under the low watermark (the mount daemon's evictor calls
        this when `pressure` is set). Returns (files, bytes freed)."""
        total_files = total_freed = 0
        while not self.core.readonly:
            excess = self.devices.used_bytes - int(self.low_watermark * self.devices.capacity)
            if excess <= 0:
                break
            files, freed = self.evict(excess, "evicted")
            if not files:
                break
            total_files += files
            total_freed += freed
            self.checkpoint()  # what was freed becomes reusable for writers
        return total_files, total_freed

    def expire(self) -> int:
        """Remove every file whose ttl ran out; returns how many."""
        total = 0
        while True:
            now = now_ns()
            with self.meta.begin() as txn:
                cur = txn.cursor(db=self.meta.db["expiry"])
                if not cur.first() or M.parse_time_key(cur.key())[0] > now:
                    return total
            files, _ = self.evict(1 << 62, "expired", deadline_ns=now)
            if not files:
                return total
            total += files

    def set_watermarks(self, high: float | None = None, low: float | None = None) -> tuple[float, float]:
        """Change the watermarks (kept in the superblock); eviction follows at once."""
        self.core.check_writable()
        with self.core.lock:
            high = self.high_watermark if high is None else high
            low = self.low_watermark if low is None else low
            check_watermarks(high, low)
            with self.meta.begin(write=True) as txn:
                sb = self.meta.get_json(txn, b"superblock")
                sb["high_watermark"], sb["low_watermark"] = high, low
                self.meta.put_json(txn, b"superblock", sb)
            self.core.sb = sb
            self.high_watermark, self.low_watermark = high, low
        if self.over_high_watermark():
            self.core.pressure.set()
        return high, low

    # -- retire ----------------------------------------------------------------------------------

    def retire(self, path: str | bytes) -> dict:
        """Remove `path` (relative to the root). A directory is detached at once (its name
        is gone, nothing can be created in it) and its subtree is deleted by reap(), in
        short batches; open files keep their data until their last close."""
        self.core.check_writable()
        ns = self.namespace
        parent, name, ino = ns.resolve(path)
        effects: list = []
        with self.core.lock:
            with self.meta.begin(write=True) as txn:
                found = ns.find(txn, parent, name)
                if found is None:
                    raise NotFound(f"{os.fsdecode(path)}: no such file or directory")
                inode = ns.get_inode(txn, found[0])
                is_dir = stat.S_ISDIR(inode.mode)
                ns.remove_entry(txn, parent, name)
                t = now_ns()
                ns.touch_dir(txn, ns.get_inode(txn, parent), t, -1 if is_dir else 0)
                if is_dir:
                    inode.nlink = 0
                    inode.ctime_ns = t
                    self.meta.put_inode(txn, inode)
                    txn.put(M.ino_key(inode.ino), M.u64(parent) + name, db=self.meta.db["retiring"])
                else:
                    ns.drop_link(txn, inode, t, effects)
                    self.counters["retired_files"] += 1
                    self.counters["retired_bytes"] += inode.size
            self.blocks.apply(effects)
        self.core.notify_removed([(parent, name, inode.ino)])
        log.info("retired %s (inode %d%s)", os.fsdecode(path), inode.ino, ", a directory" if is_dir else "")
        return {"ino": inode.ino, "directory": is_dir}

    def retiring(self) -> list[int]:
        """Directories detached by retire whose subtrees are still being deleted."""
        with self.meta.begin() as txn:
            return [M.parse_u64(k) for k, _ in txn.cursor(db=self.meta.db["retiring"])]

    def reap(self, budget: int = REAP_BATCH) -> bool:
        """Delete up to `budget` entries of retired subtrees in one transaction, deepest
        first; returns True while retired subtrees remain. Restartable at any point (it
        keeps no state but the metadata), after a crash too."""
        if self.core.readonly:
            return False
        ns = self.namespace
        effects: list = []
        files = logical = 0
        db = self.meta.db
        with self.core.lock:
            with self.meta.begin(write=True) as txn:
                cur = txn.cursor(db=db["retiring"])
                if not cur.first():
                    return False
                t = now_ns()
                stack = [(M.parse_u64(cur.key()), None, None)]  # (directory, parent, name)
                while stack and budget > 0:
                    d, parent, name = stack[-1]
                    entry = next(self.meta.iter_prefix(txn, "dirents", M.ino_key(d)), None)
                    if entry is None:  # an empty directory: it goes too
                        stack.pop()
                        if parent is not None:
                            ns.remove_entry(txn, parent, name)
                            pdir = ns.get_inode(txn, parent)
                            # The detached root has nlink 0 already (nothing may be made in it).
                            ns.touch_dir(txn, pdir, t, -1 if pdir.nlink else 0)
                        ns.purge_inode(txn, d, effects)
                        budget -= 1
                        continue
                    key, cname = entry
                    found = ns.find(txn, d, cname)
                    if found is None:  # a readdir record without its entry
                        txn.delete(key, db=db["dirents"])
                        continue
                    child = ns.get_inode(txn, found[0])
                    if stat.S_ISDIR(child.mode):
                        stack.append((child.ino, d, cname))
                        continue
                    ns.remove_entry(txn, d, cname)
                    ns.drop_link(txn, child, t, effects)
                    files += 1
                    logical += child.size
                    budget -= 1
                more = txn.cursor(db=db["retiring"]).first()
            self.blocks.apply(effects)
            self.counters["retired_files"] += files
            self.counters["retired_bytes"] += logical
        return more

    # -- damage ----------------------------------------------------------------------------------

    def quarantine(self, damage, ino: int) -> None:
        """A read of file `ino` found the stored copy of a block damaged: quarantine it
        (kvfs.blocks) and drop the file if it still holds the block: its names go now (its
        data at its last close). A file open for writing keeps its names (its writer may
        yet replace the block); other files that share the block are dropped when they
        read it. A later write of the same content heals the block. Called outside any
        read (see kvfs.blockcache.BlockCache.verified)."""
        h = damage.loc[0]
        effects: list = []
        removed: list = []
        with self.core.lock:
            if self.core.readonly:
                self.blocks.note_damaged(damage)
                return
            with self.meta.begin(write=True) as txn:
                if not self.blocks.mark_damaged(txn, damage, ino):
                    return  # healed or freed meanwhile: the copy that failed is nobody's now
                inode = self.meta.get_inode(txn, ino)
                of = self.core.open.get(ino)
                if inode is None or inode.nlink == 0 or not stat.S_ISREG(inode.mode) or (of is not None and of.writers):
                    return
                if not any(v == h for _, v in self.meta.iter_prefix(txn, "bmap", M.ino_key(ino))):
                    return  # rewritten meanwhile: what it holds now is not this block
                path = self.meta.path_of(txn, ino)
                self.namespace.remove_names(txn, ino, effects, removed)
                self.counters["quarantined_files"] += 1
                self.counters["quarantined_bytes"] += inode.size
            self.blocks.apply(effects)
        log.error("%s (inode %d, %d bytes): dropped, it holds damaged block %s", path, ino, inode.size, h.hex())
        self.core.notify_removed(removed)
