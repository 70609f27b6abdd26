"""Several users on one mount (allow_other): exactly the POSIX rules, enforced by the
kernel (default_permissions) on what the daemon reports; and a read-only mount that
refuses every way of writing with EROFS, for root and for everyone else.

Probes run as other users in a subprocess that starts as root: the interpreter lives
under /root (0700), so it imports everything it needs, then drops to the user.
"""

import json
import os
import stat
import subprocess
import sys
import textwrap

from conftest import run_kvfs
from kvfs.errors import EXIT_IN_USE

NOBODY, ALICE = 65534, 1000

PRELUDE = '''
import ctypes, errno, json, os, stat, sys
import kvfs.tools.main, kvfs.tools.client, kvfs.control, kvfs.mount, kvfs.mounttab, kvfs.catalog, kvfs.warehouse, kvfs.fsck
kvfs.tools.main.build_parser()  # and what the parser imports
libc = ctypes.CDLL(None, use_errno=True)
uid = int(sys.argv[1])
os.setgroups([])
os.setgid(uid)
os.setuid(uid)
out = {}

def attempt(name, fn):
    try:
        r = fn()
        out[name] = "ok" if r is None else r
    except OSError as exc:
        out[name] = errno.errorcode[exc.errno]

def write(path, data, mode="wb"):
    with open(path, mode) as f:
        f.write(data)

def renameat2(old, new, flags):
    if libc.renameat2(-100, old.encode(), -100, new.encode(), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))

def tool(*argv):
    """Exit status of a kvfs command run in this process, its output dropped."""
    import contextlib, io
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return kvfs.tools.main.main(list(argv))

def control(path, request):
    fd = os.open(path, os.O_RDWR)
    try:
        os.write(fd, request)
        return os.pread(fd, 65536, 0).decode()
    finally:
        os.close(fd)
'''


def as_user(uid: int, body: str) -> dict:
    """Run `body` as `uid` (its own group, no other groups); return its `out`."""
    code = PRELUDE + textwrap.dedent(body) + "\nprint(json.dumps(out))\n"
    res = subprocess.run([sys.executable, "-c", code, str(uid)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.splitlines()[-1])


def write(path, data: bytes, mode=None, owner=None):
    with open(path, "wb") as f:
        f.write(data)
    if owner is not None:
        os.chown(path, owner, owner)
    if mode is not None:
        os.chmod(path, mode)


def test_other_users_get_posix_permissions(public_mount):
    m = public_mount
    p = m.p
    write(p("priv"), b"root's secret", 0o600)
    write(p("pub"), b"root's, for all to read", 0o644)
    write(p("alice-priv"), b"alice's secret", 0o600, owner=ALICE)
    os.mkdir(p("closed"), 0o700)
    write(p("closed", "inner"), b"behind a closed door", 0o644)
    os.mkdir(p("sticky"))
    os.chmod(p("sticky"), 0o1777)
    os.mkdir(p("sgid"))
    os.chown(p("sgid"), 0, 4242)
    os.chmod(p("sgid"), 0o2777)
    alice = as_user(ALICE, f'''
        attempt("read own", lambda: open({p("alice-priv")!r}, "rb").read().decode())
        attempt("make in sticky", lambda: write({p("sticky", "alice")!r}, b"alice's"))
        attempt("chmod own", lambda: os.chmod({p("sticky", "alice")!r}, 0o644))
    ''')
    assert alice == {"read own": "alice's secret", "make in sticky": "ok", "chmod own": "ok"}

    nobody = as_user(NOBODY, f'''
        # Files of others: 0600 is private, 0644 is readable and not writable.
        attempt("read root 0600", lambda: open({p("priv")!r}, "rb").read())
        attempt("write root 0600", lambda: os.open({p("priv")!r}, os.O_WRONLY))
        attempt("read alice 0600", lambda: open({p("alice-priv")!r}, "rb").read())
        attempt("read root 0644", lambda: open({p("pub")!r}, "rb").read().decode())
        attempt("write root 0644", lambda: os.open({p("pub")!r}, os.O_RDWR))
        attempt("append root 0644", lambda: os.open({p("pub")!r}, os.O_WRONLY | os.O_APPEND))
        attempt("truncate root 0644", lambda: os.truncate({p("pub")!r}, 0))
        attempt("getxattr root 0600", lambda: os.getxattr({p("priv")!r}, "user.x"))
        attempt("setxattr root 0644", lambda: os.setxattr({p("pub")!r}, "user.x", b"1"))
        attempt("chmod root's", lambda: os.chmod({p("pub")!r}, 0o666))
        attempt("chown root's", lambda: os.chown({p("pub")!r}, {NOBODY}, {NOBODY}))
        attempt("utime root's to a time", lambda: os.utime({p("pub")!r}, (1, 1)))
        attempt("utime root's to now", lambda: os.utime({p("pub")!r}))
        # Directories of others: no entries made in root's 0755, none seen in a 0700.
        attempt("create in root's 0755", lambda: write({p("mine")!r}, b"x"))
        attempt("mkdir in root's 0755", lambda: os.mkdir({p("mine")!r}))
        attempt("unlink in root's 0755", lambda: os.unlink({p("pub")!r}))
        attempt("list root's 0700", lambda: os.listdir({p("closed")!r}))
        attempt("stat in root's 0700", lambda: os.stat({p("closed", "inner")!r}))
        # A sticky directory: make and remove one's own, not another user's.
        attempt("make in sticky", lambda: write({p("sticky", "nobody")!r}, b"nobody's"))
        attempt("unlink alice's", lambda: os.unlink({p("sticky", "alice")!r}))
        attempt("rename alice's", lambda: os.rename({p("sticky", "alice")!r}, {p("sticky", "taken")!r}))
        attempt("rename over alice's", lambda: os.rename({p("sticky", "nobody")!r}, {p("sticky", "alice")!r}))
        attempt("exchange with alice's", lambda: renameat2({p("sticky", "nobody")!r}, {p("sticky", "alice")!r}, 2))
        attempt("write alice's 0644", lambda: os.open({p("sticky", "alice")!r}, os.O_WRONLY))
        attempt("chmod alice's", lambda: os.chmod({p("sticky", "alice")!r}, 0o666))
        attempt("chown own to alice", lambda: os.chown({p("sticky", "nobody")!r}, {ALICE}, -1))
        attempt("chgrp own to root", lambda: os.chown({p("sticky", "nobody")!r}, -1, 0))
        attempt("chgrp own to own", lambda: os.chown({p("sticky", "nobody")!r}, -1, {NOBODY}))
        attempt("rename own", lambda: os.rename({p("sticky", "nobody")!r}, {p("sticky", "nobody2")!r}))
        # Writing one's own setuid file drops setuid and setgid (group-executable).
        def suid():
            path = {p("sticky", "suid")!r}
            write(path, b"#!")
            os.chmod(path, 0o6755)
            write(path, b"more", "ab")
            return oct(stat.S_IMODE(os.stat(path).st_mode))
        attempt("write own setuid file", suid)
        # A setgid directory: new entries take its group, new directories its setgid too.
        attempt("create in setgid", lambda: (write({p("sgid", "f")!r}, b"f"), os.stat({p("sgid", "f")!r}).st_gid)[1])
        attempt("mkdir in setgid", lambda: (os.mkdir({p("sgid", "d")!r}),
                                            oct(stat.S_IMODE(os.stat({p("sgid", "d")!r}).st_mode)),
                                            os.stat({p("sgid", "d")!r}).st_gid)[1:])
        attempt("chmod g+s own, not in group", lambda: (os.chmod({p("sgid", "f")!r}, 0o2755),
                                                        oct(stat.S_IMODE(os.stat({p("sgid", "f")!r}).st_mode)))[1])
        # The control directory: the control file is not for other users; lookups answer
        # only what the caller may search.
        attempt("open control", lambda: os.open({p(".kvfs", "control")!r}, os.O_RDWR))
        attempt("read control", lambda: os.open({p(".kvfs", "control")!r}, os.O_RDONLY))
        attempt("write stats", lambda: os.open({p(".kvfs", "stats.json")!r}, os.O_WRONLY))
        attempt("mkdir in .kvfs", lambda: os.mkdir({p(".kvfs", "x")!r}))
        attempt("chmod control", lambda: os.chmod({p(".kvfs", "control")!r}, 0o666))
        attempt("lookup", lambda: json.loads(control({p(".kvfs", "lookup")!r}, b'["closed/inner", "pub", "priv"]')))
        attempt("unlink own", lambda: os.unlink({p("sticky", "nobody2")!r}))
    ''')
    assert nobody == {
        "read root 0600": "EACCES", "write root 0600": "EACCES", "read alice 0600": "EACCES",
        "read root 0644": "root's, for all to read", "write root 0644": "EACCES",
        "append root 0644": "EACCES", "truncate root 0644": "EACCES", "getxattr root 0600": "EACCES",
        "setxattr root 0644": "EACCES", "chmod root's": "EPERM", "chown root's": "EPERM",
        "utime root's to a time": "EPERM", "utime root's to now": "EACCES",
        "create in root's 0755": "EACCES", "mkdir in root's 0755": "EACCES", "unlink in root's 0755": "EACCES",
        "list root's 0700": "EACCES", "stat in root's 0700": "EACCES",
        "make in sticky": "ok", "unlink alice's": "EPERM", "rename alice's": "EPERM",
        "rename over alice's": "EPERM", "exchange with alice's": "EPERM", "write alice's 0644": "EACCES",
        "chmod alice's": "EPERM", "chown own to alice": "EPERM", "chgrp own to root": "EPERM",
        "chgrp own to own": "ok", "rename own": "ok", "write own setuid file": "0o755",
        "create in setgid": 4242, "mkdir in setgid": ["0o2755", 4242], "chmod g+s own, not in group": "0o755",
        "open control": "EACCES", "read control": "EACCES", "write stats": "EACCES", "mkdir in .kvfs": "EACCES",
        "chmod control": "EPERM", "lookup": [False, True, True], "unlink own": "ok",
    }, nobody
    # Nothing of root's or alice's changed; alice still removes her own.
    assert open(p("priv"), "rb").read() == b"root's secret"
    assert open(p("pub"), "rb").read() == b"root's, for all to read"
    assert stat.S_IMODE(os.stat(p("pub")).st_mode) == 0o644 and os.stat(p("pub")).st_uid == 0
    assert open(p("sticky", "alice"), "rb").read() == b"alice's"
    assert os.listxattr(p("pub")) == []
    assert as_user(ALICE, f'attempt("unlink own", lambda: os.unlink({p("sticky", "alice")!r}))') == {"unlink own": "ok"}
    assert sorted(os.listdir(p("sticky"))) == ["suid"]
    m.umount()
    assert json.loads(run_kvfs("fsck", m.warehouse, "--json").stdout)["clean"]


def test_readonly_mount_rejects_every_write_path(public_mount):
    """-o ro: every way of writing is EROFS, for root and for other users; reads work;
    the control file cannot change anything; the warehouse is untouched."""
    m = public_mount
    p = m.p
    write(p("f"), b"kept", 0o644)
    write(p("priv"), b"root's secret", 0o600)
    os.mkdir(p("d"))
    os.mkdir(p("empty"))
    os.setxattr(p("f"), "user.tag", b"v")
    os.symlink("f", p("link"))
    m.umount()
    m.options = ["allow_other", "ro"]
    m.mount()
    ops = f'''
        attempt("create", lambda: write({p("new")!r}, b"x"))
        attempt("create O_EXCL", lambda: os.open({p("new")!r}, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        attempt("create in a directory", lambda: write({p("d", "new")!r}, b"x"))
        attempt("open O_WRONLY", lambda: os.open({p("f")!r}, os.O_WRONLY))
        attempt("open O_RDWR", lambda: os.open({p("f")!r}, os.O_RDWR))
        attempt("open O_APPEND", lambda: os.open({p("f")!r}, os.O_WRONLY | os.O_APPEND))
        attempt("open O_TRUNC", lambda: os.open({p("f")!r}, os.O_RDONLY | os.O_TRUNC))
        attempt("truncate", lambda: os.truncate({p("f")!r}, 0))
        attempt("mkdir", lambda: os.mkdir({p("nd")!r}))
        attempt("unlink", lambda: os.unlink({p("f")!r}))
        attempt("rmdir", lambda: os.rmdir({p("empty")!r}))
        attempt("rename", lambda: os.rename({p("f")!r}, {p("g")!r}))
        attempt("rename noreplace", lambda: renameat2({p("f")!r}, {p("g")!r}, 1))
        attempt("rename exchange", lambda: renameat2({p("f")!r}, {p("d")!r}, 2))
        attempt("chmod", lambda: os.chmod({p("f")!r}, 0o600))
        attempt("chown", lambda: os.chown({p("f")!r}, 1, 1))
        attempt("utime to a time", lambda: os.utime({p("f")!r}, (1, 1)))
        attempt("utime to now", lambda: os.utime({p("f")!r}))
        attempt("setxattr", lambda: os.setxattr({p("f")!r}, "user.x", b"1"))
        attempt("setxattr pin", lambda: os.setxattr({p("f")!r}, "user.kvfs.pin", b"1"))
        attempt("removexattr", lambda: os.removexattr({p("f")!r}, "user.tag"))
        attempt("symlink", lambda: os.symlink("f", {p("s")!r}))
        attempt("link", lambda: os.link({p("f")!r}, {p("h")!r}))
        attempt("mkfifo", lambda: os.mkfifo({p("fifo")!r}))
        attempt("mknod", lambda: os.mknod({p("node")!r}, 0o644 | stat.S_IFREG))
        attempt("control", lambda: control({p(".kvfs", "control")!r}, b'{{"op": "stats"}}'))
        attempt("read", lambda: open({p("f")!r}, "rb").read().decode())
        attempt("read through a link", lambda: open({p("link")!r}, "rb").read().decode())
        attempt("getxattr", lambda: os.getxattr({p("f")!r}, "user.tag").decode())
        attempt("list", lambda: sorted(os.listdir({m.path!r})))
        attempt("read 0600", lambda: open({p("priv")!r}, "rb").read().decode())
        attempt("stats", lambda: json.load(open({p(".kvfs", "stats.json")!r}))["readonly"])
        attempt("kvfs stat", lambda: tool("stat", {m.path!r}))
    '''
    refused = {
        "create", "create O_EXCL", "create in a directory", "open O_WRONLY", "open O_RDWR", "open O_APPEND",
        "open O_TRUNC", "truncate", "mkdir", "unlink", "rmdir", "rename", "rename noreplace", "rename exchange",
        "chmod", "chown", "utime to a time", "utime to now", "setxattr", "setxattr pin", "removexattr",
        "symlink", "link", "mkfifo", "mknod", "control",
    }
    reads = {"read": "kept", "read through a link": "kept", "getxattr": "v",
             "list": ["d", "empty", "f", "link", "priv"], "stats": True, "kvfs stat": 0}
    root = as_user(0, ops)
    assert root == {**{k: "EROFS" for k in refused}, **reads, "read 0600": "root's secret"}, root
    nobody = as_user(NOBODY, ops)
    assert nobody == {**{k: "EROFS" for k in refused}, **reads, "read 0600": "EACCES"}, nobody
    # The tools that only read work; those that change something say why they cannot.
    st = json.loads(run_kvfs("stat", m.path, "--json").stdout)
    assert st["readonly"] and st["files"] == 2
    assert "priv" in run_kvfs("ls", m.path).stdout
    for args in (("retire", p("f")), ("gc", m.path, "--delete"), ("tune", m.path, "--high-watermark", "50%")):
        res = run_kvfs(*args, check=False)
        assert res.returncode == EXIT_IN_USE and "mounted read-only" in res.stderr, (args, res.stderr)
    res = run_kvfs("pin", p("f"), check=False)
    assert res.returncode != 0 and "Read-only file system" in res.stderr, res.stderr
    m.umount()
    report = json.loads(run_kvfs("fsck", m.warehouse, "--json").stdout)
    assert report["clean"], report["problems"]
    m.options = ["allow_other"]
    m.mount()
    assert sorted(os.listdir(m.path)) == ["d", "empty", "f", "link", "priv"]
    assert open(p("f"), "rb").read() == b"kept" and os.listxattr(p("f")) == ["user.tag"]
