"""The read path of open files: plan a read, start read-ahead, assemble the bytes.

Owns: turning a read request on a handle into its parts (unpublished buffers, holes, cached
or stored blocks), registering it with the devices, and assembling the answer. Blocks come
verified from kvfs.blockcache; what a block index holds comes from kvfs.files. It changes
nothing stored.

Every block read from a device is verified against its hash before a byte of it is
returned; a mismatch raises Damaged (EIO) and the block is quarantined.
"""

import functools

from .core import Layer, now_ns
from .errors import Invalid


class Reader(Layer):
    """Reads of open files (see the module docstring)."""

    def __init__(self, core, files, cache):
        super().__init__(core)
        self.files = files
        self.cache = cache

    def read(self, fh: int, offset: int, size: int):
        """The bytes of a read (a bytes-like object: bytes, a memoryview of a cached block
        or a bytearray)."""
        gen, ino, parts = self._plan(fh, offset, size, cached_only=False)
        if gen is None:
            return self._assemble(parts)
        return self.cache.verified(gen, ino, self._assemble, parts)

    def read_cached(self, fh: int, offset: int, size: int):
        """The bytes of a read if the daemon holds all of them (block cache, unpublished
        buffers, holes), else None: no device I/O and no waiting, so that the FUSE layer
        may answer it without a thread hop."""
        plan = self._plan(fh, offset, size, cached_only=True)
        return None if plan is None else self._assemble(plan[2])

    def _plan(self, fh: int, offset: int, size: int, cached_only: bool):
        """Resolve a read into parts (see _assemble) and start reading ahead for a
        sequential reader. Returns (gen, ino, parts), the read registered as `gen`
        (read_begin) if it needs the devices, else gen None. cached_only: None if it would
        need them (and nothing changed)."""
        if offset < 0 or size < 0:
            raise Invalid("negative offset or size")
        bs = self.block_size
        lock = self.core.lock
        # On the event loop (cached_only) never wait for the lock: a checkpoint holds it
        # through device and metadata syncs. The read then takes the thread path.
        if not lock.acquire(blocking=not cached_only):
            return None
        try:
            h = self.files.handle(fh)
            of = self.files.open_files.get(h.ino)
            fsize = of.size
            end = min(offset + size, fsize)
            if offset >= end:
                return None, h.ino, []
            parts = []
            device = False
            hits = []  # (hash, bytes asked, block length) of blocks the cache holds
            with self.meta.begin() as txn:
                resolve = functools.partial(self.files.resolve, txn, of, h.ino)
                for idx in range(offset // bs, (end - 1) // bs + 1):
                    base = idx * bs
                    lo, hi = max(offset, base) - base, min(end, base + bs) - base
                    kind, what = resolve(idx)
                    if kind == "buf":
                        chunk = bytes(what[lo:hi])  # a dirty buffer ends early: zeros follow
                        parts.append(("data", chunk + bytes(hi - lo - len(chunk)), 0, hi - lo))
                        continue
                    if kind == "blk":
                        data = self.cache.cached(what[0])
                        if data is not None:
                            hits.append((what[0], hi - lo, len(data)))
                            kind, what = "cached", data
                        elif cached_only:
                            return None
                        else:
                            device = True
                    parts.append((kind, what, lo, hi))
                last = (end - 1) // bs
                if abs(offset - h.read_end) <= bs:
                    # A sequential reader's next blocks are read ahead into the block cache
                    # while this request is answered.
                    stop = min(last + 1 + self.cache.ahead_blocks(), (fsize + bs - 1) // bs)
                    h.ahead = max(h.ahead, self.cache.read_ahead(resolve, max(last + 1, h.ahead + 1), stop))
                else:
                    h.ahead = last  # a seek: reading ahead starts again from here
                h.read_end = end
                if end == fsize:
                    self.cache.read_through(h.ino)
            if hits:
                self.cache.served(hits)
            self.core.accessed[h.ino] = now_ns()
            self.counters["cache_hits"] += len(hits)
            return (self.devices.read_begin() if device else None), h.ino, parts
        finally:
            lock.release()

    def _assemble(self, parts: list):
        """The bytes of a read from its resolved parts (see _plan): a memoryview of one
        block where the read lies in one, else a bytearray (the FUSE layer takes either)."""
        if len(parts) == 1 and parts[0][0] in ("blk", "cached"):
            kind, what, lo, hi = parts[0]
            data = what if kind == "cached" else self.cache.fetch(what)
            if hi <= len(data):
                return memoryview(data)[lo:hi] if (lo, hi) != (0, len(data)) else data
        if not parts:
            return b""
        out = bytearray()
        for kind, what, lo, hi in parts:
            if kind == "data":
                out += what
            elif kind == "zero":
                out += bytes(hi - lo)
            else:
                data = what if kind == "cached" else self.cache.fetch(what)
                chunk = memoryview(data)[lo:hi]
                out += chunk
                if len(chunk) < hi - lo:
                    out += bytes(hi - lo - len(chunk))
        return out
