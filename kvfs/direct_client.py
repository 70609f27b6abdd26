"""The client side of the direct path (kvfs.direct_server has the protocol): find a mount's
socket, share memory with the daemon, and send it batched lookups, reads and stores.

Owns: locating the `.kvfs/direct` file above a path, checking that the socket's peer is the
mount's daemon (SO_PEERCRED), making buffers (memfds sealed against shrinking, mapped here
and handed over once), and the framing of requests. No engine, FUSE or trio imports: this
runs in the client's process (kvfs.kv, inference servers, benchmarks).

`connect(path)` returns None wherever the direct path cannot be used (no kvfs mount above
the path, an older daemon, a mount that does not serve it, a client it refuses): callers
then use ordinary file I/O through the mount, which gives the same bytes.
"""

import errno
import fcntl
import json
import logging
import mmap
import os
import socket
import struct
import threading

log = logging.getLogger("kvfs.direct")

VERSION = 1
_LEN = struct.Struct("<I")
_CRED = struct.Struct("3i")


class DirectError(OSError):
    """The direct path failed as a whole (the connection, or a refused request)."""


def control_file(path: str, name: str) -> str | None:
    """The file `name` of the control directory (.kvfs) of the kvfs mount above `path`,
    if there is one: the directories up to that mount's root are searched, no further."""
    here = os.path.abspath(path)
    while True:
        candidate = os.path.join(here, ".kvfs", name)
        if os.path.exists(candidate):
            return candidate
        if os.path.ismount(here) or here == os.path.dirname(here):
            return None
        here = os.path.dirname(here)


def find_mount(path: str) -> tuple[str, dict] | None:
    """(mount root, the .kvfs/direct description) of the kvfs mount above `path`, if it
    serves the direct path."""
    info = control_file(path, "direct")
    if info is None:
        return None
    try:
        with open(info, "rb") as f:
            return os.path.dirname(os.path.dirname(info)), json.loads(f.read())
    except (OSError, ValueError):
        return None


def connect(path: str) -> "DirectClient | None":
    """A client of the direct path of the mount `path` lies on, or None (see the module
    docstring: file I/O then)."""
    found = find_mount(path)
    if found is None:
        return None
    root, info = found
    try:
        if info.get("version") != VERSION:
            log.info("direct path of %s speaks version %s, not %s: using file I/O", root, info.get("version"), VERSION)
            return None
        return DirectClient(root, info)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.info("direct path of %s not usable (%s): using file I/O", root, exc)
        return None


class Buffer:
    """Memory shared with the daemon: `mm` (an mmap) of `size` bytes, registered as `id`."""

    def __init__(self, client: "DirectClient", buf_id: int, size: int):
        self.client = client
        self.id = buf_id
        self.size = size
        fd = os.memfd_create(f"kvfs-direct-{buf_id}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            self.mm = mmap.mmap(fd, size, flags, mmap.PROT_READ | mmap.PROT_WRITE)
            client.request({"op": "buffer", "id": buf_id}, fds=[fd])
        finally:
            os.close(fd)
        self.view = memoryview(self.mm)

    def close(self) -> None:
        """Unregister it: the daemon lets go of it. The memory stays mapped here for as
        long as anything uses it (an array made from it, say) and is unmapped with the
        last user: numpy does not hold a mapping's buffer, so closing it here could pull
        the memory out from under an array."""
        if self.mm is None:
            return
        try:
            self.client.request({"op": "unbuffer", "id": self.id})
        except OSError:
            pass
        self.view.release()
        self.mm = None


class DirectClient:
    """A connection to a mount's direct path. Thread-safe: one request at a time."""

    def __init__(self, root: str, info: dict):
        self.root = root
        self.info = info
        self.block_size = int(info["block_size"])
        self._prefix = root.rstrip("/") + "/"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.connect(info["socket"])
            pid, _, _ = _CRED.unpack(self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
            if pid != info["pid"]:
                raise DirectError(errno.EPERM, f"the socket's peer (pid {pid}) is not the mount's daemon ({info['pid']})")
        except BaseException:
            self.sock.close()
            raise
        self._lock = threading.Lock()
        self._broken = False
        self._next_id = 1
        hello = self.request({"op": "hello", "version": VERSION})
        self.readonly = bool(hello.get("readonly"))
        self.max_items = int(hello.get("max_items", 1 << 16))
        self.threads = int(hello.get("threads", 8))  # the daemon's device reads in flight

    def close(self) -> None:
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def relpath(self, path: str) -> str:
        """A path (absolute, or relative to the cwd) as the daemon names it: relative to
        the mount's root. ValueError if it is not inside the mount."""
        rel = os.path.relpath(os.path.abspath(path), self.root)
        if rel == "." or rel.startswith(".." + os.sep) or rel == "..":
            raise ValueError(f"{path} is not inside the kvfs mount {self.root}")
        return rel

    def buffer(self, size: int) -> Buffer:
        """New shared memory of `size` bytes, registered with the daemon."""
        with self._lock:
            buf_id = self._next_id
            self._next_id += 1
        return Buffer(self, buf_id, size)

    def request(self, req: dict, fds: list | None = None) -> dict:
        body = json.dumps(req, separators=(",", ":")).encode()
        msg = _LEN.pack(len(body)) + body
        with self._lock:
            if self._broken:
                raise DirectError(errno.EPIPE, "direct path: the connection was cut off mid-request earlier")
            try:
                if fds:
                    sent = socket.send_fds(self.sock, [msg], fds)
                    msg = msg[sent:]
                if msg:
                    self.sock.sendall(msg)
                (n,) = _LEN.unpack(self._recv(_LEN.size))
                reply = json.loads(self._recv(n))
            except BaseException as exc:
                # Whatever came between a request and its reply (an error, a signal): the
                # stream is out of step, and a later request would read this one's reply.
                self._broken = True
                self.sock.close()
                if isinstance(exc, (OSError, ValueError)):
                    raise DirectError(getattr(exc, "errno", None) or errno.EPIPE, f"direct path: {exc}") from None
                raise
        if not reply.get("ok"):
            raise DirectError(reply.get("errno", errno.EIO), reply.get("error", "refused"))
        return reply

    def _recv(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self.sock.recv(min(n - len(out), 1 << 20))
            if not chunk:
                raise ConnectionError("the daemon closed the connection")
            out += chunk
        return bytes(out)

    # -- requests ----------------------------------------------------------------------------

    def lookup(self, paths: list[str]) -> list[int]:
        """Size of each path's file, or -errno. Paths are absolute or mount-relative."""
        return self.request({"op": "lookup", "paths": [self._name(p) for p in paths]})["sizes"]

    def read(self, items: list) -> list[int]:
        """items: (path, file offset, length, Buffer, buffer offset). Bytes read or -errno each."""
        return self.request({"op": "read", "items": [[self._name(p), off, n, buf.id, boff]
                                                     for p, off, n, buf, boff in items]})["results"]

    def write(self, items: list, parents: bool = True, sync: bool = False) -> list[int]:
        """items: (path, Buffer, buffer offset, length, mode). Each path becomes a new file
        with those bytes, all published at once. 0 or -errno each."""
        return self.request({"op": "write", "parents": parents, "sync": sync,
                             "items": [[self._name(p), buf.id, boff, n, mode]
                                       for p, buf, boff, n, mode in items]})["results"]

    def _name(self, path: str) -> str:
        if path.startswith(self._prefix) and "/." not in path:  # (the common case, fast)
            return path[len(self._prefix):]
        return self.relpath(path) if os.path.isabs(path) else path
