"""The catalog: what a warehouse holds, read straight from its metadata (kvfs ls, find, du).

The tools open the LMDB environment read-only, beside a running daemon (LMDB serves any
number of reader processes) or on an unmounted warehouse: no walk through the mount, no
FUSE round trip per file, so a million files take seconds. The metadata directory is
readable only by root and the warehouse's owner (mkfs makes it 0700), and so is the catalog.

Annotations are the extended attributes user.kvfs.<key> (model, tenant, tokens, parent,
or any other key) of a file or of a directory above it: the nearest one wins.
"""

import fnmatch
import os
import stat
import time
from dataclasses import dataclass, field

from . import meta as M
from .errors import (
    QuietError, EXIT_NEEDS_FSCK, EXIT_NO_WAREHOUSE, EXIT_PERMISSION, EXIT_USAGE,
)

ANNOTATION_PREFIX = b"user.kvfs."
POLICY_KEYS = {"pin", "ttl", "quota", "compress"}  # kvfs's own attributes, not annotations


@dataclass
class Entry:
    path: str
    inode: M.Inode
    lineage: M.Lineage | None
    annotations: dict[str, str] = field(default_factory=dict)
    quota: tuple[int, int] | None = None

    @property
    def kind(self) -> str:
        m = self.inode.mode
        return "d" if stat.S_ISDIR(m) else "l" if stat.S_ISLNK(m) else "f" if stat.S_ISREG(m) else "o"

    def as_dict(self) -> dict:
        i, lin = self.inode, self.lineage
        d = {
            "path": self.path, "type": self.kind, "ino": i.ino, "size": i.size,
            "mode": stat.filemode(i.mode), "uid": i.uid, "gid": i.gid,
            "last_use": i.atime_ns / 1e9, "modified": i.mtime_ns / 1e9,
            "pinned": bool(i.flags & M.F_PINNED), "ttl": i.ttl or None,
            "annotations": self.annotations,
        }
        if lin is not None:
            d.update(created=lin.created_ns / 1e9, opens=lin.opens,
                     creator={"uid": lin.uid, "gid": lin.gid, "pid": lin.pid,
                              "process": lin.comm.decode(errors="replace")})
        if self.quota is not None:
            d["quota"] = {"limit": self.quota[0], "usage": self.quota[1]}
        return d


class Catalog:
    """Read-only view of a warehouse's metadata."""

    def __init__(self, warehouse: str):
        meta_dir = os.path.join(warehouse, "meta")
        try:
            self.meta = M.Meta(os.stat(meta_dir) and meta_dir, readonly=True)
        except FileNotFoundError:
            raise QuietError(f"{warehouse} is not a kvfs warehouse", EXIT_NO_WAREHOUSE) from None
        except PermissionError:
            raise QuietError(f"{warehouse}: the catalog is for root and the warehouse owner",
                             EXIT_PERMISSION) from None
        except Exception as exc:
            raise QuietError(f"{warehouse}: metadata cannot be read ({exc}); run kvfs fsck", EXIT_NEEDS_FSCK) from None
        with self.meta.begin() as txn:
            sb = self.meta.get_json(txn, b"superblock") or {}
        if sb.get("format") not in M.FORMAT_READABLE:
            self.meta.close()
            raise QuietError(f"{warehouse}: format revision {sb.get('format')} is not supported", EXIT_NO_WAREHOUSE)

    def close(self) -> None:
        self.meta.close()

    def resolve(self, txn, rel: str) -> M.Inode:
        ino = M.ROOT_INO
        for part in M.path_parts(rel):
            raw = txn.get(M.dentry_key(ino, part), db=self.meta.db["dentries"])
            if raw is None:
                raise QuietError(f"{rel}: no such file or directory in the warehouse", EXIT_USAGE)
            ino = M.parse_dentry_val(raw)[0]
        inode = self.meta.get_inode(txn, ino)
        if inode is None:
            raise QuietError(f"{rel}: inode {ino} is missing; run kvfs fsck", EXIT_NEEDS_FSCK)
        return inode

    def _entry(self, txn, path: str, inode: M.Inode, inherited: dict[str, str]) -> Entry:
        notes = dict(inherited)
        for key, val in self.meta.iter_prefix(txn, "xattrs", M.ino_key(inode.ino) + ANNOTATION_PREFIX):
            name = key[8 + len(ANNOTATION_PREFIX):].decode(errors="replace")
            if name not in POLICY_KEYS:
                notes[name] = val.decode(errors="replace")
        return Entry(path, inode, self.meta.get_lineage(txn, inode.ino), notes,
                     self.meta.get_quota(txn, inode.ino) if stat.S_ISDIR(inode.mode) else None)

    def entries(self, txn, rel: str, base: str, recursive: bool):
        """Entry of `rel` (shown as `base`), then, for a directory, its entries (and, if
        recursive, everything below them), depth first in readdir order."""
        inherited: dict[str, str] = {}
        top = self.resolve(txn, rel)
        ino = M.ROOT_INO
        for part in M.path_parts(rel):
            inherited = self._entry(txn, "", self.meta.get_inode(txn, ino), inherited).annotations
            ino = M.parse_dentry_val(txn.get(M.dentry_key(ino, part), db=self.meta.db["dentries"]))[0]
        first = self._entry(txn, base, top, inherited)
        yield first
        if first.kind != "d":
            return
        stack = [(top.ino, base, first.annotations)]
        while stack:
            d, path, notes = stack.pop()
            children = []
            for key, name in self.meta.iter_prefix(txn, "dirents", M.ino_key(d)):
                raw = txn.get(M.dentry_key(d, name), db=self.meta.db["dentries"])
                inode = raw and self.meta.get_inode(txn, M.parse_dentry_val(raw)[0])
                if not inode:
                    continue
                e = self._entry(txn, os.path.join(path, os.fsdecode(name)), inode, notes)
                yield e
                if recursive and e.kind == "d":
                    children.append((inode.ino, e.path, e.annotations))
            stack.extend(reversed(children))


@dataclass
class Filter:
    """The tests of `kvfs find`; None means any."""
    kind: str | None = None
    name: str | None = None
    min_size: int | None = None
    max_size: int | None = None
    unused_for: float | None = None  # seconds since the last use, at least
    used_within: float | None = None
    older_than: float | None = None  # seconds since creation, at least
    newer_than: float | None = None
    pinned: bool | None = None
    uid: int | None = None
    creator: str | None = None  # process name, a glob
    annotations: dict[str, str | None] = field(default_factory=dict)  # key -> value (None: any)
    now: float = field(default_factory=time.time)

    def __call__(self, e: Entry) -> bool:
        i = e.inode
        age = lambda t_ns: self.now - t_ns / 1e9  # noqa: E731
        created = e.lineage.created_ns if e.lineage else i.ctime_ns
        checks = (
            self.kind is None or e.kind == self.kind,
            self.name is None or fnmatch.fnmatchcase(os.path.basename(e.path), self.name),
            self.min_size is None or i.size >= self.min_size,
            self.max_size is None or i.size <= self.max_size,
            self.unused_for is None or age(i.atime_ns) >= self.unused_for,
            self.used_within is None or age(i.atime_ns) < self.used_within,
            self.older_than is None or age(created) >= self.older_than,
            self.newer_than is None or age(created) < self.newer_than,
            self.pinned is None or bool(i.flags & M.F_PINNED) == self.pinned,
            self.uid is None or (e.lineage.uid if e.lineage else i.uid) == self.uid,
            self.creator is None or (e.lineage is not None and fnmatch.fnmatchcase(
                e.lineage.comm.decode(errors="replace"), self.creator)),
            all(k in e.annotations and (v is None or e.annotations[k] == v)
                for k, v in self.annotations.items()),
        )
        return all(checks)


def du(catalog: Catalog, txn, rel: str, base: str) -> list[dict]:
    """Files, directories and bytes (file sizes) below each entry of directory `rel`,
    largest first, then the whole of it."""
    total = {"path": base, "files": 0, "dirs": 0, "bytes": 0}
    rows = []
    for child in catalog.entries(txn, rel, base, recursive=False):
        if child.path == base:
            continue
        row = {"path": child.path, "files": 0, "dirs": 0, "bytes": 0}
        name = os.path.basename(child.path)
        below = catalog.entries(txn, os.path.join(rel, name), child.path, recursive=True) if child.kind == "d" else [child]
        for e in below:
            if e.kind == "f":
                row["files"] += 1
                row["bytes"] += e.inode.size
            elif e.kind == "d" and e is not child and e.path != child.path:
                row["dirs"] += 1
        rows.append(row)
        for k in ("files", "dirs", "bytes"):
            total[k] += row[k]
        total["dirs"] += child.kind == "d"
    return sorted(rows, key=lambda r: (-r["bytes"], r["path"])) + [total]
