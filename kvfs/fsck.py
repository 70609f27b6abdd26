"""kvfs fsck and kvfs gc: check a warehouse against the invariants of its schema.

One `check_*` method per invariant; each records problems in `self.problems` (and
`found_errors`). With repair=True, fixes are made in the same write transaction: reference
counts are recomputed from the block maps, leaked extents go back to the free map, entries
that point nowhere are dropped, derived indexes are rebuilt. Nothing that is intact is
touched. Extents that a repair frees are listed in `self.freed`, so that a running mount
(gc) can give them to its allocator too.

`gc()` is the part of this that reclaims space, for a mounted warehouse as well as an
unmounted one: it scans a snapshot without holding the warehouse, and only if it found
something (and was asked to delete) scans again under the warehouse's lock and repairs.
"""

import collections
import json
import os
import stat
import sys
import time

from . import codec as codecs
from . import meta as M
from .errors import Corrupt, KvfsError, EXIT_FSCK_ERRORS, EXIT_OK
from .store import DATA_START, round_up
from .units import plural
from .warehouse import Warehouse


DEFAULT_GC_GRACE = 300.0  # seconds: unlinked or unfinished inodes younger than this stay


class Fsck:
    def __init__(self, wh: Warehouse, txn, repair: bool = False, progress: bool = False,
                 held: frozenset[bytes] | set[bytes] = frozenset()):
        self.wh = wh
        self.meta = wh.meta
        self.db = wh.meta.db
        self.txn = txn
        self.repair = repair
        self.held = held  # on a running mount: blocks that open writers hold at refcount 0
        self.problems: list[str] = []
        self.repaired = 0
        self.freed: list[tuple[int, int, int]] = []  # (device, offset, length) repairs freed
        # What gc may reclaim: ("block", hash, record bytes, references counted) and
        # ("extent", device, offset, length), found whether or not repairing.
        self.candidates: list[tuple] = []
        self.stats = collections.Counter()
        self.show_progress = progress  # a bar per step on standard error (a terminal)
        self.step = ""

    def each(self, dbname: str) -> list:
        """Every record of a sub-database (a list: checks may change the database while
        they go), with a progress bar when asked for."""
        records = list(self.txn.cursor(db=self.db[dbname]))
        if not self.show_progress:
            return records
        from tqdm import tqdm

        return tqdm(records, desc=f"kvfs fsck: {self.step}", unit=" records", leave=False,
                    file=sys.stderr, dynamic_ncols=True, mininterval=0.5)

    @property
    def found_errors(self) -> bool:
        return bool(self.problems)

    def problem(self, msg: str, fixed: bool = False) -> None:
        self.problems.append(msg + (" (repaired)" if fixed else ""))
        if fixed:
            self.repaired += 1

    def run(self, verify_data: bool = False) -> None:
        self.step = "checking remote files"
        self.check_remote()  # first: a file it removes leaves entries for check_entries
        self.step = "checking directory entries"
        self.check_entries()
        self.step = "checking inodes and link counts"
        self.check_inodes()
        self.step = "checking the eviction indexes"
        self.check_indexes()
        damaged: dict[bytes, str] = {}
        verified: set[bytes] = set()
        if verify_data:
            self.step = "verifying block data"
            damaged, verified = self.check_data()
        # Counts first: the files that damaged blocks take with them are dropped through the
        # engine, whose reference counting must start from exact counts.
        self.step = "checking block references"
        self.check_refcounts()
        self.step = "checking damaged blocks"
        self.check_quarantine(damaged, verified)
        self.step = "checking extents and free space"
        self.check_extents()
        self.step = "checking totals and quotas"
        self.check_totals()
        self.check_quotas()

    def check_entries(self) -> None:
        txn, db = self.txn, self.db
        self.links = collections.Counter()
        self.subdirs = collections.Counter()
        for key, val in self.each("dentries"):
            parent = M.parse_u64(key[:8])
            name = key[8:]
            ino, entry_id = M.parse_dentry_val(val)
            self.stats["entries"] += 1
            child = self.meta.get_inode(txn, ino)
            pnode = self.meta.get_inode(txn, parent)
            if child is None or pnode is None or not stat.S_ISDIR(pnode.mode):
                fix = self.repair
                self.problem(f"entry {name!r} in {parent} points to missing inode {ino}", fix)
                if fix:
                    txn.delete(key, db=db["dentries"])
                    txn.delete(M.dirent_key(parent, entry_id), db=db["dirents"])
                continue
            if txn.get(M.dirent_key(parent, entry_id), db=db["dirents"]) != name:
                fix = self.repair
                self.problem(f"entry {name!r} in {parent} has no readdir record", fix)
                if fix:
                    txn.put(M.dirent_key(parent, entry_id), name, db=db["dirents"])
            if txn.get(M.link_key(ino, parent, name), db=db["links"]) is None:
                fix = self.repair
                self.problem(f"entry {name!r} in {parent} has no link record", fix)
                if fix:
                    self.meta.add_link(txn, ino, parent, name)
            self.links[ino] += 1
            if stat.S_ISDIR(child.mode):
                self.subdirs[parent] += 1
        for key, name in self.each("dirents"):
            parent, entry_id = M.parse_dirent_key(key)
            raw = txn.get(M.dentry_key(parent, name), db=db["dentries"])
            if raw is None or M.parse_dentry_val(raw)[1] != entry_id:
                fix = self.repair
                self.problem(f"stale readdir record {name!r} in {parent}", fix)
                if fix:
                    txn.delete(key, db=db["dirents"])
        for key, _ in self.each("links"):
            ino, parent, name = M.parse_link_key(key)
            raw = txn.get(M.dentry_key(parent, name), db=db["dentries"])
            if raw is None or M.parse_dentry_val(raw)[0] != ino:
                fix = self.repair
                self.problem(f"stale link record of inode {ino}: {name!r} in {parent}", fix)
                if fix:
                    txn.delete(key, db=db["links"])

    def check_inodes(self) -> None:
        txn, db = self.txn, self.db
        orphans = {M.parse_u64(k) for k, _ in txn.cursor(db=db["orphans"])}
        retiring = {M.parse_u64(k) for k, _ in txn.cursor(db=db["retiring"])}
        for key, val in self.each("inodes"):
            inode = M.Inode.unpack(M.parse_u64(key), val)
            self.stats["inodes"] += 1
            if inode.ino == M.ROOT_INO:
                expect = 2 + self.subdirs[inode.ino]
            elif stat.S_ISDIR(inode.mode):
                expect = (1 + 1 + self.subdirs[inode.ino]) if self.links[inode.ino] else 0
            else:
                expect = self.links[inode.ino]
            if expect == 0 and inode.ino != M.ROOT_INO:
                if inode.ino in orphans or inode.ino in retiring:
                    continue  # unlinked while open (recovery purges it) or being retired
                fix = self.repair
                self.problem(f"inode {inode.ino} is in no directory (lost)", fix)
                if fix:
                    # check_refcounts, later, settles the counts of its blocks
                    self.meta.delete_inode_records(txn, inode.ino)
                continue
            if inode.nlink != expect:
                fix = self.repair
                self.problem(f"inode {inode.ino} has nlink {inode.nlink}, expected {expect}", fix)
                if fix:
                    inode.nlink = expect
                    self.meta.put_inode(txn, inode)
        for name in ("orphans", "incomplete", "symlinks", "retiring", "lineage", "quotas"):
            for key, _ in list(txn.cursor(db=db[name])):
                if txn.get(key, db=db["inodes"]) is None:
                    fix = self.repair
                    self.problem(f"{name} record for missing inode {M.parse_u64(key)}", fix)
                    if fix:
                        txn.delete(key, db=db[name])

    def check_remote(self) -> None:
        """A remote record (kvfs.shared_files) describes a regular file: its block size is
        valid and its hashes cover the file's size; the file's block map is empty (a record
        left beside a full block map is a first open interrupted after its commit)."""
        txn, db = self.txn, self.db
        if db.get("remote") is None:
            return
        for key, val in self.each("remote"):
            ino = M.parse_u64(key)
            inode = self.meta.get_inode(txn, ino)
            self.stats["remote_files"] += 1
            if inode is None:
                fix = self.repair
                self.problem(f"remote record for missing inode {ino}", fix)
                if fix:
                    txn.delete(key, db=db["remote"])
                continue
            if next(self.meta.iter_prefix(txn, "bmap", key), None) is not None:
                fix = self.repair
                self.problem(f"remote record of inode {ino} outlived the fetch of its data", fix)
                if fix:
                    txn.delete(key, db=db["remote"])
                continue
            bs, hashes = M.parse_remote_val(val)
            if (not stat.S_ISREG(inode.mode) or bs < 4096 or bs & (bs - 1)
                    or len(hashes) != (inode.size + bs - 1) // bs):
                fix = self.repair
                # Its data cannot be known: the file goes (the next lookup reads it through
                # again); check_entries then drops its names.
                self.problem(f"remote record of inode {ino} does not describe it (the file is dropped "
                             "by a repair)", fix)
                if fix:
                    self.meta.delete_inode_records(txn, ino)

    def check_indexes(self) -> None:
        """lru and expiry hold exactly the keys derived from the inodes (meta.evict_keys)."""
        txn, db = self.txn, self.db
        want = {"lru": set(), "expiry": set()}
        for key, val in txn.cursor(db=db["inodes"]):
            lru, expiry = M.evict_keys(M.Inode.unpack(M.parse_u64(key), val))
            if lru is not None:
                want["lru"].add(lru)
            if expiry is not None:
                want["expiry"].add(expiry)
        for name, keys in want.items():
            have = {k for k, _ in txn.cursor(db=db[name])}
            for k in sorted(have - keys):
                fix = self.repair
                self.problem(f"{name} index names inode {M.parse_time_key(k)[1]} wrongly", fix)
                if fix:
                    txn.delete(k, db=db[name])
            for k in sorted(keys - have):
                fix = self.repair
                self.problem(f"{name} index misses inode {M.parse_time_key(k)[1]}", fix)
                if fix:
                    txn.put(k, b"", db=db[name])

    def check_totals(self) -> None:
        """The totals record equals the sums over inodes and blocks (after the repairs
        above, which keep it in step themselves)."""
        txn, db = self.txn, self.db
        want = M.Totals()
        for key, val in txn.cursor(db=db["inodes"]):
            files, nbytes = M.inode_totals(M.Inode.unpack(M.parse_u64(key), val))
            want.files += files
            want.file_bytes += nbytes
        for _, val in txn.cursor(db=db["blocks"]):
            raw, stored, referenced = M.block_totals(M.BlockRecord.unpack(val))
            want.block_bytes += raw
            want.stored_bytes += stored
            want.referenced_bytes += referenced
        have = self.meta.get_totals(txn)
        if have != want:
            fix = self.repair
            self.problem(f"totals are {have}, counted {want}", fix)
            if fix:
                txn.put(M.TOTALS_KEY, want.pack(), db=db["totals"])

    def check_quotas(self) -> None:
        txn, db = self.txn, self.db
        for key, _ in list(txn.cursor(db=db["quotas"])):
            ino = M.parse_u64(key)
            inode = self.meta.get_inode(txn, ino)
            if inode is None:
                continue  # check_inodes reports the record of a missing inode
            limit, usage = self.meta.get_quota(txn, ino)
            if not stat.S_ISDIR(inode.mode):
                fix = self.repair
                self.problem(f"quota on inode {ino}, which is not a directory", fix)
                if fix:
                    self.meta.set_quota(txn, ino, None)
                continue
            counted = self.meta.tree_usage(txn, ino)
            if usage != counted:
                fix = self.repair
                self.problem(f"quota usage of directory {ino} is {usage}, counted {counted}", fix)
                if fix:
                    self.meta.set_quota(txn, ino, limit)

    def check_refcounts(self) -> None:
        txn, db = self.txn, self.db
        refs = collections.Counter()
        for key, h in self.each("bmap"):
            ino, idx = M.parse_bmap_key(key)
            if txn.get(M.ino_key(ino), db=db["inodes"]) is None:
                fix = self.repair
                self.problem(f"block map of missing inode {ino} (block {idx})", fix)
                if fix:
                    txn.delete(key, db=db["bmap"])
                continue
            if txn.get(h, db=db["blocks"]) is None:
                self.problem(f"inode {ino} block {idx} names block {h.hex()} that is not stored")
                continue
            refs[h] += 1
        for h, val in self.each("blocks"):
            rec = M.BlockRecord.unpack(val)
            self.stats["blocks"] += 1
            if refs[h] == 0 and rec.refcount == 0 and h in self.held:
                continue  # a file being written holds it; its commit counts it
            if rec.refcount != refs[h] or refs[h] == 0:
                fix = self.repair
                what = ("is referenced by no file (leaked)" if refs[h] == 0
                        else f"has refcount {rec.refcount}, counted {refs[h]}")
                if refs[h] == 0:
                    self.stats["leaked_bytes"] += round_up(rec.stored_len)
                self.candidates.append(("block", h, bytes(val), refs[h]))
                self.problem(f"block {h.hex()} {what}", fix)
                if fix:
                    if refs[h] == 0:
                        self.wh.blocks.free_block(txn, bytes(h), rec, self.freed)
                    else:
                        rec.refcount = refs[h]
                        self.meta.put_block(txn, h, rec)

    def check_extents(self) -> None:
        txn, db = self.txn, self.db
        ndev = len(self.wh.devices.devices)
        spans = [[] for _ in range(ndev)]
        for h, val in txn.cursor(db=db["blocks"]):
            rec = M.BlockRecord.unpack(val)
            if rec.dev >= ndev:
                self.problem(f"block {h.hex()} lives on unknown device {rec.dev}")
                continue
            spans[rec.dev].append((rec.offset, round_up(rec.stored_len), "block " + h.hex()))
        for key, val in txn.cursor(db=db["free"]):
            dev, off = M.parse_free_key(key)
            if dev >= ndev:
                self.problem(f"free extent on unknown device {dev}")
                continue
            spans[dev].append((off, M.parse_u64(val), "free"))
        for dev, items in enumerate(spans):
            size = self.wh.devices.devices[dev].size
            items.sort()
            pos = DATA_START
            leaks = []
            prev = None
            for off, length, what in items:
                if off < pos:
                    self.problem(f"device {dev}: {what} at {off} overlaps the extent before it")
                elif off > pos:
                    leaks.append((pos, off - pos))
                elif prev is not None and prev[2] == what == "free":
                    # The free map is kept coalesced: two free neighbours are one extent.
                    fix = self.repair
                    self.problem(f"device {dev}: free extents at {prev[0]} and {off} are not merged", fix)
                    if fix:
                        txn.delete(M.free_key(dev, off), db=db["free"])
                        txn.put(M.free_key(dev, prev[0]), M.u64(prev[1] + length), db=db["free"])
                        off, length = prev[0], prev[1] + length
                prev = (off, length, what)
                pos = max(pos, off + length)
            if pos > size:
                self.problem(f"device {dev}: extents run past the end of the device ({pos} > {size})")
            elif pos < size:
                leaks.append((pos, size - pos))
            for off, length in leaks:
                self.stats["leaked_bytes"] += length
                self.candidates.append(("extent", dev, off, length))
                fix = self.repair
                self.problem(f"device {dev}: {length} bytes at {off} leaked (neither used nor free)", fix)
                if fix:
                    self.meta.free_add(txn, dev, off, length)
                    self.freed.append((dev, off, length))

    def check_data(self) -> tuple[dict[bytes, str], set[bytes]]:
        """Read and verify every stored block: ({hash: reason} of those whose stored copy
        is wrong, hashes of those verified). A block the device fails to read (twice) is a
        problem left alone: that is the device's fault, not damage to drop files for."""
        damaged, verified = {}, set()
        for h, val in self.each("blocks"):
            rec = M.BlockRecord.unpack(val)
            if rec.dev >= len(self.wh.devices.devices):
                continue  # check_extents reports it
            for attempt in (1, 2):
                try:
                    stored = self.wh.devices.devices[rec.dev].pread(rec.stored_len, rec.offset)
                    codecs.decode(stored, rec.codec, rec.raw_len, h)
                except Corrupt as exc:
                    damaged[bytes(h)] = str(exc)
                except KvfsError as exc:
                    if attempt == 1:
                        continue
                    self.problem(f"block {h.hex()} on device {rec.dev} at {rec.offset} cannot be read: {exc}")
                else:
                    self.stats["verified_blocks"] += 1
                    verified.add(bytes(h))
                break
        return damaged, verified

    def check_quarantine(self, damaged: dict[bytes, str], verified: set[bytes] = frozenset()) -> None:
        """Quarantine records name stored blocks as they are; blocks that are damaged
        (quarantined by a mount, or found by --verify-data) are held by no file. Repair
        quarantines them and drops the files that hold them: never served, and what is
        intact stays."""
        txn = self.txn
        bad: dict[bytes, str] = {}
        for h, q in list(self.meta.iter_quarantine(txn)):
            rec = self.meta.get_block(txn, h)
            if rec is None or (rec.dev, rec.offset) != (q.dev, q.offset) or h in verified:
                fix = self.repair
                what = "a copy that is gone" if h not in verified else "a copy that verifies now"
                self.problem(f"quarantine record of block {h.hex()} names {what}", fix)
                if fix:
                    self.meta.delete_quarantine(txn, h)
                continue
            bad[h] = q.reason or "quarantined"
        for h, reason in damaged.items():
            if h not in bad:
                bad[h] = reason
                if self.repair:
                    rec = self.meta.get_block(txn, h)
                    self.meta.put_quarantine(txn, h, M.Quarantined(
                        rec.dev, rec.offset, rec.stored_len, time.time_ns(), 0, reason))
        self.stats["damaged_blocks"] = len(bad)
        if not bad:
            return
        holders = collections.defaultdict(list)
        for key, h in self.each("bmap"):
            if bytes(h) in bad:
                holders[bytes(h)].append(M.parse_bmap_key(key)[0])
        effects: list = []
        removed: list = []
        for h, reason in bad.items():
            inos = sorted(set(holders[h]))
            if not inos:
                if h in damaged:  # (a quarantined block nobody holds is a leak: check_refcounts)
                    self.problem(f"block {h.hex()} is damaged ({reason}); no file holds it", self.repair)
                continue
            paths = [self.meta.path_of(txn, ino) for ino in inos[:3]]
            more = f" and {len(inos) - 3} more" if len(inos) > 3 else ""
            fix = self.repair
            self.problem(f"block {h.hex()} is damaged ({reason}); files holding it: "
                         f"{', '.join(paths)}{more}", fix)
            if fix:
                for ino in inos:
                    inode = self.meta.get_inode(txn, ino)
                    if inode is not None and inode.nlink > 0:
                        self.wh.namespace.remove_names(txn, ino, effects, removed)
                        self.stats["dropped_files"] += 1
        self.freed.extend(effects)


def gc(wh: Warehouse, delete: bool = False, grace: float = DEFAULT_GC_GRACE) -> dict:
    """Find space that nothing uses, and with delete=True give it back: leaked extents,
    block records that no file references (or that count wrong), unlinked inodes nobody
    has open, files created and never finished. Blocks and inodes that a running mount's
    open files use are never candidates; unlinked and unfinished inodes younger than
    `grace` seconds are left alone (reported as young).

    The scan reads a snapshot without holding the warehouse; the repair then takes the
    lock only to re-check and fix each candidate (a record that changed since the snapshot
    is left for the next run), so a mount is not stalled for a scan of all metadata."""
    now = time.time_ns()
    with wh.snapshot() as (txn, held, open_inos):
        f = Fsck(wh, txn, held=held)
        young = 0
        for dbname, what in (("orphans", "unlinked inode"), ("incomplete", "unfinished file")):
            for key, _ in txn.cursor(db=f.db[dbname]):
                ino = M.parse_u64(key)
                inode = f.meta.get_inode(txn, ino)
                if ino in open_inos or inode is None:
                    continue  # open: its last close frees it; missing: fsck's business
                if now - inode.ctime_ns < grace * 1e9:
                    young += 1
                    continue
                f.problem(f"{what} {ino} ({inode.size} bytes) is not open")
                f.candidates.append((dbname, ino))
        f.check_refcounts()
        f.check_extents()
    report = {"problems": f.problems, "leaked_bytes": f.stats["leaked_bytes"], "young": young,
              "reclaimed_bytes": 0, "changed_meanwhile": 0, "deleted": False}
    if delete and f.candidates:
        # Inodes last: purging them changes the block records checked before.
        order = {"extent": 0, "block": 1, "orphans": 2, "incomplete": 2}
        todo = sorted(f.candidates, key=lambda c: order[c[0]])
        freed, skipped = wh.maintain(lambda txn, effects, removed: _reclaim(wh, txn, todo, effects, removed))
        report.update(reclaimed_bytes=freed, changed_meanwhile=skipped, deleted=True)
    return report


def _reclaim(wh: Warehouse, txn, candidates: list[tuple], effects: list, removed: list) -> tuple[int, int]:
    """Fix gc's candidates that are still as the snapshot saw them (under the lock);
    returns (bytes freed, candidates skipped because they changed)."""
    meta, db = wh.meta, wh.meta.db
    held = wh.held_blocks()
    start, skipped = len(effects), 0
    for c in candidates:
        kind = c[0]
        if kind == "extent":
            _, dev, off, length = c
            try:  # a leak stays a leak: only the free map and block records name space
                meta.free_add(txn, dev, off, length)
            except Corrupt:
                skipped += 1
                continue
            effects.append((dev, off, length))
        elif kind == "block":
            _, h, seen, counted = c
            raw = txn.get(h, db=db["blocks"])
            if raw is None or bytes(raw) != seen or (counted == 0 and h in held):
                skipped += 1  # every change to its references changes the record
                continue
            rec = M.BlockRecord.unpack(raw)
            if counted == 0:
                wh.blocks.free_block(txn, h, rec, effects)
            else:
                rec.refcount = counted
                meta.put_block(txn, h, rec)
        else:
            ino = c[1]
            if wh.is_open(ino) or txn.get(M.ino_key(ino), db=db[kind]) is None:
                skipped += 1
                continue
            if kind == "orphans":
                wh.purge_unlinked(txn, ino, effects)
            else:
                wh.drop_incomplete(txn, ino, effects, removed)
    return sum(round_up(length) for _, _, length in effects[start:]), skipped


def restore_backup(warehouse: str, meta_dir: str) -> dict:
    """Put the newest metadata backup that reads back whole in place of the damaged
    metadata (the caller holds the warehouse lock). The damaged copy is kept beside it
    (meta.damaged-TIME); the backup's data file replaces the damaged one in one rename,
    synced first, so a crash leaves one or the other. QuietError if no backup reads back."""
    import shutil

    from .errors import QuietError, EXIT_NEEDS_FSCK
    from .layout import BACKUP_DIRS

    tried = []
    for name in BACKUP_DIRS:
        backup = os.path.join(warehouse, name)
        if not os.path.isfile(os.path.join(backup, "data.mdb")):
            continue
        check = M.verify_in_child(backup)
        if check["problems"]:
            tried.append(f"{name}: {check['problems'][0]}")
            continue
        taken = os.path.getmtime(os.path.join(backup, "data.mdb"))
        kept = os.path.join(warehouse, "meta.damaged-" + time.strftime("%Y%m%d-%H%M%S"))
        shutil.copytree(meta_dir, kept)
        staging = os.path.join(meta_dir, "data.mdb.restoring")
        shutil.copyfile(os.path.join(backup, "data.mdb"), staging)
        M.fsync_file(staging)
        os.replace(staging, os.path.join(meta_dir, "data.mdb"))
        try:
            os.unlink(os.path.join(meta_dir, "lock.mdb"))  # LMDB's reader table: made anew
        except FileNotFoundError:
            pass
        return {"backup": name, "taken": taken, "records": check["records"], "damaged_copy": kept}
    raise QuietError(f"{warehouse}: metadata is damaged and no backup reads back whole"
                     + (f" ({'; '.join(tried)})" if tried else " (there is none)"), EXIT_NEEDS_FSCK)


def run_fsck(args) -> int:
    from .errors import QuietError, EXIT_INTERNAL, EXIT_NEEDS_FSCK, EXIT_NO_WAREHOUSE
    from .layout import META_DIR, take_lock

    meta_dir = os.path.join(args.warehouse, META_DIR)
    restored = None
    if not os.path.isdir(meta_dir):
        raise QuietError(f"{args.warehouse} is not a kvfs warehouse (no {META_DIR}/)", EXIT_NO_WAREHOUSE)
    lock_fd = take_lock(args.warehouse)  # held from the check to the end: no mount meanwhile
    try:
        try:
            damage = M.verify_in_child(meta_dir)
        except OSError as exc:
            raise QuietError(f"{args.warehouse}: {exc}", EXIT_INTERNAL) from None
        if damage["problems"]:
            if not args.repair:
                for p in damage["problems"][:20]:
                    print(f"  metadata: {p}", file=sys.stderr)
                raise QuietError(f"{args.warehouse}: metadata is damaged; kvfs fsck --repair restores the newest "
                                 "metadata backup and verifies every block against it", EXIT_NEEDS_FSCK)
            restored = restore_backup(args.warehouse, meta_dir)
            restored["damage"] = damage["problems"][:20]
            print(f"kvfs fsck: metadata was damaged ({damage['problems'][0]}); restored {restored['backup']} "
                  f"of {time.ctime(restored['taken'])}; the damaged copy is {restored['damaged_copy']}",
                  file=sys.stderr)
            args.verify_data = True  # extents may have been reused since the backup
    except BaseException:
        os.close(lock_fd)
        raise
    wh = Warehouse(args.warehouse, check_only=not args.repair, lock_fd=lock_fd)  # owns the lock now
    tty = sys.stderr.isatty() and not args.json
    try:
        recovered = wh.recovery
        with wh.meta.begin(write=args.repair) as txn:
            f = Fsck(wh, txn, repair=args.repair, progress=tty)
            f.run(verify_data=args.verify_data)
        if restored is not None:
            # Files created since the backup are gone; those whose blocks were reused since
            # then were dropped above. What is left reads back as it was stored.
            f.problem(f"metadata restored from {restored['backup']} of {time.ctime(restored['taken'])}", True)
    finally:
        wh.close()
    unrepaired = len(f.problems) - f.repaired
    report = {
        "warehouse": os.path.abspath(args.warehouse),
        "clean": not f.problems,
        "problems": f.problems,
        "repaired": f.repaired,
        "recovery": recovered,
        "restored": restored,
        "stats": dict(f.stats),
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for p in f.problems:
            print(f"  {p}")
        s = f.stats
        print(f"kvfs fsck: {plural(s['inodes'], 'inode')}, {plural(s['entries'], 'entry', 'entries')}, "
              f"{plural(s['blocks'], 'block')}: "
              + ("clean" if not f.problems else f"{plural(len(f.problems), 'problem')}, {f.repaired:,} repaired"))
    return EXIT_OK if unrepaired == 0 else EXIT_FSCK_ERRORS
