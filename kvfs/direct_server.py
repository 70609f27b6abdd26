"""The direct path's side channel: a Unix socket the mount daemon serves, over which a
kvfs-aware client hands the daemon shared memory once and then sends batched requests.

Owns: the socket (in a private directory of its own, named in the mount's `.kvfs/direct`),
who each peer is (SO_PEERCRED, supplementary groups from /proc), the peer's registered
buffers (memfds sealed against shrinking, mapped here), framing and validating requests,
and turning engine errors into errnos for replies. The work is kvfs.direct's. Plain threads:
no trio, no FUSE; nothing here blocks the mount's event loop.

Protocol (version 1; kvfs-direct(7) is the reference). Every message either way is a
4-byte little-endian length followed by that many bytes of JSON (a request at most
MAX_REQUEST bytes). Replies are {"ok": true, ...} or {"ok": false, "errno": N, "error": "..."}.

    {"op": "hello", "version": 1}           -> {"version", "block_size", "readonly", "max_items",
                                                "threads"}
    {"op": "buffer", "id": N}  + one fd (SCM_RIGHTS): a memfd sealed with F_SEAL_SHRINK
                                            -> {"id", "size"}   (at most MAX_BUFFERS per peer)
    {"op": "unbuffer", "id": N}             -> {}
    {"op": "lookup", "paths": [p, ...]}     -> {"sizes": [size or -errno, ...]}
    {"op": "read", "items": [[path, file_offset, length, buffer_id, buffer_offset], ...]}
                                            -> {"results": [bytes read or -errno, ...]}
    {"op": "write", "items": [[path, buffer_id, buffer_offset, length, mode], ...],
     "parents": bool, "sync": bool}         -> {"results": [0 or -errno, ...]}

Paths are relative to the mount's root. An item whose buffer range is not inside a
registered buffer fails with -EFAULT; a malformed request fails whole with EINVAL. A mount
without allow_other serves only its owner's processes, as the kernel does for the mount.
"""

import array
import errno
import fcntl
import json
import logging
import mmap
import os
import socket
import stat
import struct
import tempfile
import threading

from .direct import DIRECT_THREADS, MAX_ITEMS, Caller
from .errors import KvfsError

log = logging.getLogger("kvfs.direct")

VERSION = 1
MAX_REQUEST = 256 << 20
MAX_BUFFERS = 64
MAX_BUFFER_BYTES = 1 << 40
MAX_PEERS = 256
MAX_PEERS_PER_USER = 32  # one user cannot take every connection from the others
MAX_REFUSING = 16  # peers being told they are not served (a mount without allow_other)
REFUSE_TIMEOUT_S = 5.0
_LEN = struct.Struct("<I")
_CRED = struct.Struct("3i")
_F_SEAL_FUTURE_WRITE = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x10)  # Linux 5.1 (not in Python's fcntl)


class _Bad(Exception):
    """A request that fails whole: errno and message for the reply."""

    def __init__(self, err: int, msg: str):
        super().__init__(msg)
        self.errno = err


def peer_groups(pid: int) -> frozenset:
    """The supplementary groups of process `pid` (empty if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return frozenset(int(g) for g in line.split()[1:])
    except OSError:
        pass
    return frozenset()


def recv_exact(sock: socket.socket, n: int, fds: list | None = None) -> bytes | None:
    """n bytes from the socket (None at a clean end of stream before any); file
    descriptors that arrive with them go to `fds` (closed if fds is None)."""
    chunks, got = [], 0
    while got < n:
        data, ancdata, _, _ = sock.recvmsg(min(n - got, 1 << 20), socket.CMSG_SPACE(4 * 4))
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                received = array.array("i")
                received.frombytes(payload[:len(payload) - len(payload) % 4])
                for fd in received:
                    if fds is None:
                        os.close(fd)
                    else:
                        fds.append(fd)
        if not data:
            if got == 0:
                return None
            raise ConnectionError("the peer closed the connection mid-message")
        chunks.append(data)
        got += len(data)
    return b"".join(chunks)


def send_message(sock: socket.socket, obj, fds: list | None = None) -> None:
    body = json.dumps(obj, separators=(",", ":")).encode()
    msg = _LEN.pack(len(body)) + body
    if fds:
        sent = socket.send_fds(sock, [msg], fds)
        msg = msg[sent:]
    if msg:
        sock.sendall(msg)


class _Peer:
    """One connected client: who it is and the buffers it registered."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        pid, uid, gid = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
        self.caller = Caller(uid, gid, peer_groups(pid), pid)
        self.buffers: dict[int, mmap.mmap] = {}

    def close(self) -> None:
        for mm in self.buffers.values():
            try:
                mm.close()
            except BufferError:  # a view is still alive somewhere: the GC unmaps it
                pass
        self.buffers.clear()
        self.sock.close()

    def view(self, buf_id, offset, length, views: dict) -> memoryview | None:
        """The buffer range, or None if it is not inside a registered buffer. views: the
        request's memoryviews of whole buffers (one each; released after the request)."""
        whole = views.get(buf_id)
        if whole is None:
            mm = self.buffers.get(buf_id)
            if mm is None:
                return None
            whole = views[buf_id] = memoryview(mm)
        if offset < 0 or length < 0 or offset + length > len(whole):
            return None
        return whole[offset:offset + length]


class DirectServer:
    """Serves the direct path of an open warehouse on a Unix socket (see the module
    docstring). only_uid: serve only this user's processes (a mount without allow_other)."""

    def __init__(self, wh, only_uid: int | None = None, runtime_dir: str | None = None):
        self.wh = wh
        self.only_uid = only_uid
        # Named by the warehouse: one left by a daemon that was killed is this warehouse's
        # (its lock is ours now) and goes.
        prefix = f"kvfs-direct-{wh.sb['uuid'][:8]}-"
        base = runtime_dir or tempfile.gettempdir()
        for name in os.listdir(base):
            if name.startswith(prefix):
                _remove_socket_dir(os.path.join(base, name))
        self.dir = tempfile.mkdtemp(prefix=prefix, dir=base)
        os.chmod(self.dir, 0o711)  # others may reach the socket, not list the directory
        self.path = os.path.join(self.dir, "socket")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(self.path)
        os.chmod(self.path, 0o666)  # anyone may connect; every request is checked
        self._sock.listen(64)
        self._peers: set[_Peer] = set()
        self._refusing = 0
        self._lock = threading.Lock()
        self._stopping = False
        self._thread = threading.Thread(target=self._accept, name="kvfs-direct-accept", daemon=True)

    def start(self) -> None:
        self._thread.start()
        log.info("direct path served on %s", self.path)

    def describe(self) -> bytes:
        """The content of the mount's .kvfs/direct."""
        return json.dumps({"version": VERSION, "socket": self.path, "pid": os.getpid(),
                           "block_size": self.wh.block_size}).encode() + b"\n"

    def stop(self) -> None:
        """Stop serving: no new peers, connected ones are cut off (their requests in
        flight end first: the engine finishes what it started)."""
        self._stopping = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        with self._lock:
            peers = list(self._peers)
        for peer in peers:
            try:
                peer.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        _remove_socket_dir(self.dir)

    def _accept(self) -> None:
        while not self._stopping:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                if self._stopping:
                    return
                continue
            with self._lock:
                try:
                    peer = _Peer(conn)
                except OSError:
                    conn.close()
                    continue
                uid = peer.caller.uid
                if self.only_uid is not None and uid != self.only_uid:
                    # Not served at all: told so, without taking a slot from those who are.
                    if self._refusing < MAX_REFUSING:
                        self._refusing += 1
                        threading.Thread(target=self._refuse, args=(peer,), name="kvfs-direct-refuse",
                                         daemon=True).start()
                    else:
                        conn.close()
                    continue
                mine = sum(1 for p in self._peers if p.caller.uid == uid)
                if len(self._peers) >= MAX_PEERS or (uid != 0 and mine >= MAX_PEERS_PER_USER):
                    conn.close()
                    log.warning("direct path: %d clients connected (%d of uid %d), refusing another",
                                len(self._peers), mine, uid)
                    continue
                self._peers.add(peer)
            threading.Thread(target=self._serve, args=(peer,), name="kvfs-direct-peer", daemon=True).start()

    def _refuse(self, peer: _Peer) -> None:
        """Answer a peer this mount does not serve: its first request gets EACCES."""
        try:
            peer.sock.settimeout(REFUSE_TIMEOUT_S)
            head = recv_exact(peer.sock, _LEN.size)
            if head is not None and _LEN.unpack(head)[0] <= MAX_REQUEST:
                recv_exact(peer.sock, _LEN.unpack(head)[0])
            send_message(peer.sock, _error(errno.EACCES, "this mount serves only its owner (mount it with -o allow_other)"))
        except (OSError, ConnectionError):
            pass
        finally:
            peer.close()
            with self._lock:
                self._refusing -= 1

    def _serve(self, peer: _Peer) -> None:
        try:
            while not self._stopping:
                fds: list[int] = []
                try:
                    head = recv_exact(peer.sock, _LEN.size, fds)
                    if head is None:
                        return
                    (n,) = _LEN.unpack(head)
                    if n > MAX_REQUEST:
                        send_message(peer.sock, _error(errno.EMSGSIZE, f"request of {n} bytes (at most {MAX_REQUEST})"))
                        return  # the stream cannot be trusted past this
                    body = recv_exact(peer.sock, n, fds) if n else b""
                    if body is None:
                        return
                    reply = self._handle(peer, body, fds)
                finally:
                    for fd in fds:
                        os.close(fd)
                send_message(peer.sock, reply)
        except (ConnectionError, OSError) as exc:
            if not self._stopping:
                log.debug("direct path: peer %d went away: %s", peer.caller.pid, exc)
        finally:
            with self._lock:
                self._peers.discard(peer)
            peer.close()

    def _handle(self, peer: _Peer, body: bytes, fds: list) -> dict:
        try:
            if self.only_uid is not None and peer.caller.uid != self.only_uid:
                raise _Bad(errno.EACCES, "this mount serves only its owner (mount it with -o allow_other)")
            try:
                req = json.loads(body)
            except (UnicodeDecodeError, ValueError, RecursionError):
                raise _Bad(errno.EINVAL, "a request is one JSON object") from None
            if not isinstance(req, dict) or not isinstance(req.get("op"), str):
                raise _Bad(errno.EINVAL, "a request is a JSON object with an \"op\"")
            op = req["op"]
            handler = getattr(self, f"_op_{op}", None)
            if handler is None:
                raise _Bad(errno.EINVAL, f"unknown operation {op!r}")
            reply = handler(peer, req, fds)
            reply["ok"] = True
            return reply
        except _Bad as exc:
            return _error(exc.errno, str(exc))
        except KvfsError as exc:
            return _error(exc.errno, str(exc))
        except Exception as exc:  # a bug: that request fails, the daemon serves on
            log.exception("direct path: %s request failed", req.get("op") if isinstance(req, dict) else "?")
            return _error(errno.EIO, f"internal error: {exc}")

    # -- operations --------------------------------------------------------------------------

    def _op_hello(self, peer, req, fds) -> dict:
        return {"version": VERSION, "block_size": self.wh.block_size, "readonly": self.wh.readonly,
                "max_items": MAX_ITEMS, "threads": DIRECT_THREADS}

    def _op_buffer(self, peer, req, fds) -> dict:
        buf_id = req.get("id")
        if not _is_int(buf_id):
            raise _Bad(errno.EINVAL, "buffer needs an integer id")
        if len(fds) != 1:
            raise _Bad(errno.EINVAL, f"buffer takes exactly one file descriptor ({len(fds)} came)")
        if buf_id not in peer.buffers and len(peer.buffers) >= MAX_BUFFERS:
            raise _Bad(errno.EMFILE, f"at most {MAX_BUFFERS} buffers per client")
        fd = fds[0]
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _Bad(errno.EINVAL, "a buffer is a memfd")
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError:
            raise _Bad(errno.EINVAL, "a buffer is a memfd made with MFD_ALLOW_SEALING") from None
        if not seals & fcntl.F_SEAL_SHRINK:
            raise _Bad(errno.EINVAL, "a buffer must be sealed with F_SEAL_SHRINK")
        if seals & (fcntl.F_SEAL_WRITE | _F_SEAL_FUTURE_WRITE):
            raise _Bad(errno.EINVAL, "a buffer must be writable (not sealed with F_SEAL_WRITE or F_SEAL_FUTURE_WRITE)")
        if not 0 < st.st_size <= MAX_BUFFER_BYTES:
            raise _Bad(errno.EINVAL, f"a buffer holds 1 byte to {MAX_BUFFER_BYTES} bytes")
        try:
            mm = mmap.mmap(fd, st.st_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            raise _Bad(exc.errno or errno.EINVAL, f"the buffer cannot be mapped: {exc.strerror or exc}") from None
        old = peer.buffers.pop(buf_id, None)
        if old is not None:
            old.close()
        peer.buffers[buf_id] = mm
        return {"id": buf_id, "size": st.st_size}

    def _op_unbuffer(self, peer, req, fds) -> dict:
        mm = peer.buffers.pop(req.get("id"), None)
        if mm is None:
            raise _Bad(errno.ENOENT, "no such buffer")
        mm.close()
        return {}

    def _op_lookup(self, peer, req, fds) -> dict:
        paths = req.get("paths")
        if not isinstance(paths, list):
            raise _Bad(errno.EINVAL, "lookup needs a list of paths")
        return {"sizes": self.wh.direct.lookup(peer.caller, paths)}

    def _op_read(self, peer, req, fds) -> dict:
        items = _items(req, 5)
        work, where, results, views = [], [], [0] * len(items), {}
        for i, (path, offset, length, buf_id, buf_off) in enumerate(items):
            if not all(_is_int(v) for v in (offset, length, buf_id, buf_off)):
                raise _Bad(errno.EINVAL, "a read item is [path, offset, length, buffer id, buffer offset]")
            view = peer.view(buf_id, buf_off, length, views)
            if view is None:
                results[i] = -errno.EFAULT
                continue
            work.append((path, offset, length, view))
            where.append(i)
        try:
            for i, r in zip(where, self.wh.direct.read(peer.caller, work)):
                results[i] = r
        finally:
            _release(work, views)
        return {"results": results}

    def _op_write(self, peer, req, fds) -> dict:
        items = _items(req, 5)
        work, where, results, views = [], [], [0] * len(items), {}
        for i, (path, buf_id, buf_off, length, mode) in enumerate(items):
            if not all(_is_int(v) for v in (buf_id, buf_off, length, mode)):
                raise _Bad(errno.EINVAL, "a write item is [path, buffer id, buffer offset, length, mode]")
            view = peer.view(buf_id, buf_off, length, views)
            if view is None:
                results[i] = -errno.EFAULT
                continue
            work.append((path, view, mode))
            where.append(i)
        try:
            done = self.wh.direct.store(peer.caller, work, parents=bool(req.get("parents")),
                                        sync=bool(req.get("sync")))
            for i, r in zip(where, done):
                results[i] = r
        finally:
            _release(work, views)
        return {"results": results}


def _release(work: list, views: dict) -> None:
    """Let go of a request's views of its peer's buffers (a buffer with views cannot be
    unmapped)."""
    for item in work:
        for v in item:
            if isinstance(v, memoryview):
                v.release()
    for v in views.values():
        v.release()


def _remove_socket_dir(path: str) -> None:
    """Remove a socket directory of ours: its socket, then it, never anything else (a
    directory holding more stays; rmdir refuses a mount point)."""
    try:
        sock = os.path.join(path, "socket")
        if os.path.lexists(sock) and stat.S_ISSOCK(os.lstat(sock).st_mode):
            os.unlink(sock)
        os.rmdir(path)
    except OSError:
        pass


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _items(req: dict, width: int) -> list:
    items = req.get("items")
    if not isinstance(items, list) or len(items) > MAX_ITEMS:
        raise _Bad(errno.EINVAL, f"items must be a list of at most {MAX_ITEMS}")
    if not all(isinstance(it, list) and len(it) == width for it in items):
        raise _Bad(errno.EINVAL, f"each item is a list of {width} values")
    return items


def _error(err: int, msg: str) -> dict:
    return {"ok": False, "errno": err, "error": msg or os.strerror(err)}
