"""The content-addressed block store: dedup, holds, reference counts, freeing, quarantine.

Owns: block records (hash -> extent, lengths, codec, refcount), the in-memory holds that
uncommitted files and uploads keep on blocks, the set of stored copies known to be damaged,
and giving extents back (to the persistent free map in the caller's transaction, to the
allocator only after that transaction: `apply`). Knows nothing of names, files or policy:
callers pass it hashes and transactions. Runs under Core.lock.

Blocks that an uncommitted file refers to are "held", so a concurrent unlink that drops the
last committed reference keeps the record (with refcount 0) until the commit takes it or the
hold goes away; recovery frees whatever is left at refcount 0.
"""

import collections
import logging
from dataclasses import dataclass

from . import meta as M
from .core import Layer, now_ns
from .errors import Corrupt, KvfsError
from .store import round_up

log = logging.getLogger("kvfs.warehouse")


@dataclass(frozen=True)
class Pending:
    """A block an open file refers to that is not committed yet."""

    hash: bytes
    dev: int
    offset: int
    stored_len: int
    raw_len: int
    codec: int
    own: bool  # True: this file allocated and wrote the extent; False: dedup onto a record

    def loc(self) -> tuple:
        """Where its bytes are, as kvfs.blockcache reads them."""
        return (self.hash, self.dev, self.offset, self.stored_len, self.raw_len, self.codec)


def record_loc(h: bytes, rec: M.BlockRecord) -> tuple:
    """Where stored block `h` is, as kvfs.blockcache reads it."""
    return (h, rec.dev, rec.offset, rec.stored_len, rec.raw_len, rec.codec)


class BlockStore(Layer):
    """The warehouse's blocks (see the module docstring)."""

    def __init__(self, core):
        super().__init__(core)
        self.held: dict[bytes, int] = collections.Counter()
        self.bad_blocks: set[tuple[bytes, int, int]] = set()  # (hash, device, offset)

    def load_quarantine(self, txn) -> None:
        for h, q in self.meta.iter_quarantine(txn):
            self.bad_blocks.add((h, q.dev, q.offset))

    def is_damaged(self, h: bytes, dev: int, off: int) -> bool:
        return (h, dev, off) in self.bad_blocks

    # -- finding and writing ------------------------------------------------------------

    def dedup(self, h: bytes) -> Pending | None:
        """A writer's reference to block `h` if it is stored and sound (counted as a block
        deduplicated), else None: the writer stores it."""
        with self.meta.begin() as txn:
            rec = self.meta.get_block(txn, h)
        if rec is None or (h, rec.dev, rec.offset) in self.bad_blocks:
            return None
        self.counters["dedup_blocks"] += 1
        return Pending(h, rec.dev, rec.offset, rec.stored_len, rec.raw_len, rec.codec, False)

    def write(self, h: bytes, stored, dev: int, off: int, raw_len: int, codec: int) -> Pending:
        """Write a new copy of block `h` (already encoded) to the extent allocated for it."""
        try:
            self.devices.devices[dev].pwrite(stored, off)
        except BaseException as exc:
            self.devices.release(dev, off, len(stored), durable=False)
            if isinstance(exc, KvfsError):
                self.counters["device_errors"] += 1
            raise
        self.counters["stored_blocks"] += 1
        return Pending(h, dev, off, len(stored), raw_len, codec, True)

    # -- holds ---------------------------------------------------------------------------

    def hold(self, h: bytes, n: int = 1) -> None:
        self.held[h] += n

    def unhold(self, h: bytes, n: int = 1) -> bool:
        """Let go of `n` holds on `h`; True if none is left."""
        left = self.held.get(h, 0) - n
        if left > 0:
            self.held[h] = left
            return False
        self.held.pop(h, None)  # (gone if the warehouse closed without waiting)
        return True

    def drop_holds(self, txn, effects: list) -> None:
        """Let go of every hold, freeing what only they kept (a clean close: holds left
        then are an upload's that will never finish)."""
        for h in list(self.held):
            del self.held[h]
            self.settle_unreferenced(txn, h, effects)

    def release(self, hashes) -> None:
        """Let go of one hold on each of `hashes`, freeing a block nothing refers to any more."""
        gone = [h for h in hashes if self.unhold(h)]
        if gone:
            effects: list = []
            with self.meta.begin(write=True) as txn:
                for h in gone:
                    self.settle_unreferenced(txn, h, effects)
            self.apply(effects)

    def drop_pending(self, p: Pending) -> None:
        """Forget an uncommitted block: release its hold, give back an extent we wrote."""
        self.release([p.hash])
        if p.own:
            self.devices.release(p.dev, p.offset, p.stored_len, durable=False)

    # -- references ----------------------------------------------------------------------

    def reference(self, txn, p: Pending, effects: list) -> bool:
        """Count one more reference to pending block `p`, creating its record if needed.
        Returns True if `p`'s copy healed a damaged stored copy (the record moved to it)."""
        rec = self.meta.get_block(txn, p.hash)
        if rec is None:
            if not p.own:
                raise Corrupt(f"held block {p.hash.hex()} vanished before commit")
            self.meta.put_block(txn, p.hash, M.BlockRecord(p.dev, p.offset, p.stored_len, p.raw_len, p.codec, 1))
            self.meta.free_remove(txn, p.dev, p.offset, round_up(p.stored_len))
            return False
        if not p.own and (p.hash, rec.dev, rec.offset) in self.bad_blocks:
            # Found stored when written, found damaged since: the bytes are not kept, so the
            # commit fails (EIO) rather than publish a block that cannot be read.
            raise Corrupt(f"block {p.hash.hex()} that this file shares was found damaged before "
                          "its commit; write the file again")
        rec.refcount += 1
        healed = False
        if p.own and (rec.dev, rec.offset) != (p.dev, p.offset):
            if (p.hash, rec.dev, rec.offset) in self.bad_blocks:
                # The stored copy failed verification: heal it with the copy just written.
                self.free_copy(txn, p.hash, rec.dev, rec.offset, rec.stored_len, effects)
                self.meta.delete_quarantine(txn, p.hash)
                self.counters["healed_blocks"] += 1
                rec.dev, rec.offset, rec.stored_len = p.dev, p.offset, p.stored_len
                rec.raw_len, rec.codec = p.raw_len, p.codec
                self.meta.free_remove(txn, p.dev, p.offset, round_up(p.stored_len))
                healed = True
            else:
                effects.append((p.dev, p.offset, p.stored_len))
        self.meta.put_block(txn, p.hash, rec)
        return healed

    def decref(self, txn, h: bytes, effects: list, releasing=None) -> None:
        rec = self.meta.get_block(txn, h)
        if rec is None or rec.refcount == 0:
            # Metadata was already inconsistent: there is nothing to free. Failing here
            # would turn it into a failed unlink, unmount or recovery; fsck repairs it.
            self.counters["refcount_errors"] += 1
            log.error("block %s: a reference was dropped that was not counted; run kvfs fsck --repair", h.hex())
            return
        rec.refcount -= 1
        self.settle(txn, h, rec, effects, releasing)

    def settle(self, txn, h: bytes, rec: M.BlockRecord, effects: list, releasing=None) -> None:
        """Store `rec`, or free it if nothing refers to it and no open file holds it (but
        for the holds `releasing`, which the caller is about to let go of)."""
        if rec.refcount == 0 and self.held.get(h, 0) - (releasing or {}).get(h, 0) <= 0:
            self.free_block(txn, h, rec, effects)
        else:
            self.meta.put_block(txn, h, rec)

    def settle_unreferenced(self, txn, h: bytes, effects: list) -> None:
        """Free block `h` if it is recorded with no reference and nothing holds it."""
        rec = self.meta.get_block(txn, h)
        if rec is not None and rec.refcount == 0:
            self.settle(txn, h, rec, effects)

    def free_block(self, txn, h: bytes, rec: M.BlockRecord, effects: list) -> None:
        """Delete block `h`'s record (its quarantine record goes with it) and give its
        extent back: to the free map now, to the allocator by apply(effects)."""
        self.meta.delete_block(txn, h)
        self.free_copy(txn, h, rec.dev, rec.offset, rec.stored_len, effects)

    def free_copy(self, txn, h: bytes, dev: int, off: int, length: int, effects: list) -> None:
        """Give back the extent of a stored copy of block `h` that nothing names any more."""
        self.bad_blocks.discard((h, dev, off))
        self.meta.free_add(txn, dev, off, round_up(length))
        effects.append((dev, off, length))

    def apply(self, effects: list) -> None:
        """Hand the extents freed by a committed transaction to the allocator (it reuses
        them once the free is durable and no read that started before it still runs)."""
        for dev, off, length in effects:
            self.devices.release(dev, off, length)

    # -- damage --------------------------------------------------------------------------

    def mark_damaged(self, txn, damage, ino: int) -> bool:
        """Record (in LMDB) that the stored copy `damage.loc` of a block failed verification,
        so that it is never read or deduplicated against again. False if that copy is
        nobody's any more (healed or freed meanwhile)."""
        h, dev, off, slen = damage.loc[:4]
        rec = self.meta.get_block(txn, h)
        if rec is None or (rec.dev, rec.offset) != (dev, off):
            return False
        self.bad_blocks.add((h, dev, off))
        if self.meta.get_quarantine(txn, h) is None:
            self.meta.put_quarantine(txn, h, M.Quarantined(dev, off, slen, now_ns(), ino, str(damage)))
            self.counters["corrupt_blocks"] += 1
            log.error("block %s on device %d at %d failed verification (%s): quarantined",
                      h.hex(), dev, off, damage)
        return True

    def note_damaged(self, damage) -> None:
        """As mark_damaged, in memory only (a read-only open cannot record it)."""
        h, dev, off = damage.loc[:3]
        if (h, dev, off) not in self.bad_blocks:
            self.bad_blocks.add((h, dev, off))
            self.counters["corrupt_blocks"] += 1
            log.error("block %s on device %d at %d failed verification (%s): returning EIO "
                      "(read-only mount: not recorded; run kvfs fsck --verify-data)", h.hex(), dev, off, damage)
