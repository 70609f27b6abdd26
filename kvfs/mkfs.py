"""Making a warehouse (kvfs mkfs): its devices, their headers and its first metadata.

Owns: checking what mkfs is asked for, preparing the devices (kvfs.store) and writing the
superblock, the free maps and the root directory (kvfs.meta); and, when it fails, removing
what it made. Touches no open warehouse: kvfs.warehouse opens what this made.
"""

import contextlib
import os
import shutil
import stat
import time
import uuid as uuidlib

from . import codec as codecs
from . import meta as M
from .core import now_ns
from .errors import Invalid, QuietError, EXIT_EXISTS, EXIT_USAGE
from .layout import DEFAULT_DEVICE, META_DIR, default_size, take_lock
from .policy import DEFAULT_HIGH_WATERMARK, DEFAULT_LOW_WATERMARK, check_watermarks
from .store import DATA_START, prepare_device

DEFAULT_BLOCK_SIZE = 1 << 20
MIN_BLOCK_SIZE, MAX_BLOCK_SIZE = 4096, 16 << 20


def make_warehouse(path: str, devices: list[tuple[str, int | None]] | None = None,
                   size: int | None = None, block_size: int = DEFAULT_BLOCK_SIZE,
                   compression: str = "none", force: bool = False,
                   high_watermark: float = DEFAULT_HIGH_WATERMARK,
                   low_watermark: float = DEFAULT_LOW_WATERMARK) -> dict:
    """Make a new warehouse (kvfs mkfs). Returns its superblock."""
    path = os.path.abspath(path)
    if block_size < MIN_BLOCK_SIZE or block_size > MAX_BLOCK_SIZE or block_size & (block_size - 1):
        raise QuietError(f"block size {block_size} must be a power of two from 4 KiB to 16 MiB", EXIT_USAGE)
    try:
        check_watermarks(high_watermark, low_watermark)
    except Invalid as exc:
        raise QuietError(str(exc), EXIT_USAGE) from None
    if compression not in codecs.CODEC_NAMES:
        raise QuietError(f"unknown codec {compression!r}", EXIT_USAGE)
    meta_dir = os.path.join(path, META_DIR)
    if os.path.exists(meta_dir):
        if not force:
            raise QuietError(f"{path} already holds a warehouse (use --force to replace it)", EXIT_EXISTS)
        lock_fd = take_lock(path)  # refuse to wipe a mounted warehouse
        os.close(lock_fd)
        shutil.rmtree(meta_dir)
    # What this call creates, it removes again if it fails: the warehouse directory, a
    # device file, a directory made for one, the metadata. What was there before stays
    # (a directory, a block device or file given with --device, files --force reuses).
    made = []

    def making(p: str) -> None:
        top = None  # the topmost component of p that does not exist yet
        while not os.path.lexists(p):
            top, p = p, os.path.dirname(p)
        if top is not None:
            made.append(top)


    try:
        making(path)
        os.makedirs(path, exist_ok=True)
        wh_uuid = str(uuidlib.uuid4())
        if not devices:
            devices = [(DEFAULT_DEVICE, size if size is not None else default_size(path))]
        devs = []
        for index, (dpath, dsize) in enumerate(devices):
            full = dpath if os.path.isabs(dpath) else os.path.join(path, dpath)
            making(full)
            real_size = prepare_device(full, dsize, wh_uuid, index, force or dpath == DEFAULT_DEVICE)
            devs.append({"path": dpath, "size": real_size})
        sb = {
            "format": M.FORMAT_REVISION,
            "uuid": wh_uuid,
            "block_size": block_size,
            "devices": devs,
            "compression": compression,
            "created": time.time(),
            "high_watermark": high_watermark,
            "low_watermark": low_watermark,
        }
        making(meta_dir)
        meta = M.Meta(meta_dir)
        os.chmod(meta_dir, 0o700)  # names, lineage and annotations are for root and the owner
        try:
            with meta.begin(write=True) as txn:
                meta.put_json(txn, b"superblock", sb)
                meta.put_json(txn, b"state", {"clean": True})
                for index, d in enumerate(devs):
                    txn.put(M.free_key(index, DATA_START), M.u64(d["size"] - DATA_START), db=meta.db["free"])
                t = now_ns()
                root = M.Inode(M.ROOT_INO, stat.S_IFDIR | 0o755, 2, os.getuid(), os.getgid(), 0, t, t, t)
                meta.put_inode(txn, root)
                txn.put(b"next_ino", M.u64(M.ROOT_INO + 1), db=meta.db["counters"])
                txn.put(b"next_entry", M.u64(1), db=meta.db["counters"])
            meta.sync()
        finally:
            meta.close()
    except BaseException:
        for p in reversed(made):
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(p)
        raise
    return sb
