"""Operating a warehouse, on real mounts: kvfs stat, the catalog (ls, find, du) with
lineage and annotations, quotas and other users, Prometheus metrics, fsck on planted damage."""

import errno
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import run_kvfs
from kvfs import direct_client, meta as M
from kvfs.errors import EXIT_FSCK_ERRORS, EXIT_MOUNT_FAILED, EXIT_PERMISSION, EXIT_USAGE
from kvfs.warehouse import Warehouse

MiB = 1 << 20


def write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def drop_caches():
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def test_stat_reports_space_savings_and_counters(make_mount):
    m = make_mount()
    data = os.urandom(4 * MiB)
    write(m.p("a"), data)
    write(m.p("b"), data)  # the same bytes again: deduplicated
    os.mkdir(m.p("z"))
    os.setxattr(m.p("z"), "user.kvfs.compress", b"zstd")
    write(m.p("z", "c"), "".join(f"{j:08d}" for j in range(MiB // 2)).encode())  # 4 MiB, compresses
    drop_caches()  # lookups reach the daemon again
    for name in ("a", "b", "nope1", "nope2", "nope3"):
        os.path.exists(m.p(name))
    st = json.loads(run_kvfs("stat", m.path, "--json").stdout)
    assert st["files"] == 3 and st["file_bytes"] == 12 * MiB
    assert st["referenced_bytes"] == 12 * MiB and st["block_bytes"] == 8 * MiB
    assert st["dedup_ratio"] == 1.5
    assert st["compression_ratio"] > 1.5
    assert st["counters"]["lookup_hit"] >= 2 and st["counters"]["lookup_miss"] >= 3
    assert 0 < st["hit_rate"] < 1
    assert st["mountpoint"] == m.path and not st["clean"]
    assert sum(d["write_bytes"] for d in st["devices"]) >= 4 * MiB
    assert st["used"] == sum(d["size"] - d["free"] for d in st["devices"])
    human = run_kvfs("stat", m.path).stdout
    assert "dedup 1.50x" in human and f"mounted on {m.path}" in human
    assert "files      3 holding 12.0 MiB; 8 blocks of" in human
    assert re.search(r"^device 0 .* used; since mount [\d,]+ reads? \(.*\), [\d,]+ writes? \(", human, re.M), human
    m.umount()
    # Unmounted, this command is the only reader: no "since mount" counts to show.
    human = run_kvfs("stat", m.warehouse).stdout
    assert f"{m.warehouse} (clean)" in human and re.search(r"^device 1 .* used$", human, re.M), human
    assert "since mount" not in human and "1 files" not in human, human
    offline = json.loads(run_kvfs("stat", m.warehouse, "--json").stdout)
    assert offline["clean"] and offline["mountpoint"] is None
    for key in ("files", "file_bytes", "block_bytes", "stored_bytes", "referenced_bytes", "used"):
        assert offline[key] == st[key], key
    assert offline["counters"]["lookup_miss"] >= st["counters"]["lookup_miss"]  # persisted


def test_catalog_finds_by_lineage_annotation_size_and_use(make_mount):
    m = make_mount()
    os.makedirs(m.p("models", "llama"))
    os.setxattr(m.p("models", "llama"), "user.kvfs.model", b"llama-3-8b")
    for i in range(3):  # made by dd: the catalog remembers the process
        subprocess.run(["dd", "if=/dev/urandom", f"of={m.p('models', 'llama', f'c{i}.kv')}",
                        "bs=1M", "count=2", "status=none"], check=True)
    write(m.p("models", "qwen", "q.kv"), os.urandom(MiB))
    os.setxattr(m.p("models", "qwen", "q.kv"), "user.kvfs.tenant", b"acme")
    os.utime(m.p("models", "llama", "c0.kv"), (time.time() - 3 * 86400,) * 2)  # unused 3 days
    run_kvfs("pin", m.p("models", "llama", "c2.kv"))
    for _ in range(3):
        with open(m.p("models", "llama", "c1.kv"), "rb") as f:
            f.read(10)
    m.remount()  # opens are counted in memory until a checkpoint

    def find(*args):
        return json.loads(run_kvfs("find", *args, "--json").stdout)

    llama = find(m.p("models"), "--model", "llama-3-8b", "--type", "f")
    assert sorted(os.path.basename(e["path"]) for e in llama) == ["c0.kv", "c1.kv", "c2.kv"]
    assert all(e["creator"]["process"] == "dd" and e["size"] == 2 * MiB for e in llama)
    assert {os.path.basename(e["path"]): e["opens"] for e in llama}["c1.kv"] >= 4
    assert [e["path"] for e in find(m.path, "--tenant", "acme")] == [m.p("models", "qwen", "q.kv")]
    assert [os.path.basename(e["path"]) for e in find(m.path, "--unused-for", "2d")] == ["c0.kv"]
    assert [os.path.basename(e["path"]) for e in find(m.path, "--pinned")] == ["c2.kv"]
    assert len(find(m.path, "--creator", "dd")) == 3
    assert len(find(m.path, "--min-size", "2M", "--max-size", "2M")) == 3
    assert find(m.path, "--name", "q.*") == find(m.path, "--annotation", "tenant=acme")
    out = run_kvfs("ls", m.p("models", "llama")).stdout
    assert "c1.kv" in out and "dd[" in out and "model=llama-3-8b" in out
    du = json.loads(run_kvfs("du", m.p("models"), "--json").stdout)
    assert du[0] == {"path": m.p("models", "llama"), "files": 3, "dirs": 0, "bytes": 6 * MiB}
    assert du[-1] == {"path": m.p("models"), "files": 4, "dirs": 2, "bytes": 7 * MiB}
    rows = run_kvfs("du", m.p("models")).stdout.splitlines()
    assert [row.split()[2:] for row in rows] == [["3", "files", m.p("models", "llama")],
                                                 ["1", "file", m.p("models", "qwen")],
                                                 ["4", "files", m.p("models")]], rows
    assert run_kvfs("ls", m.p("nothing"), check=False).returncode == EXIT_USAGE
    # The same answers from an unmounted warehouse.
    m.umount()
    offline = json.loads(run_kvfs("find", m.warehouse, "--model", "llama-3-8b", "--type", "f", "--json").stdout)
    assert sorted(e["ino"] for e in offline) == sorted(e["ino"] for e in llama)


def test_another_user_gets_posix_rules_quota_and_no_control(public_mount):
    """A second, unprivileged user on a shared mount: cannot read or remove root's 0600
    file, cannot raise its own quota, gets EDQUOT past it, cannot drive the control
    interface or read the catalog."""
    m = public_mount
    secret = m.p("shared", "root-only.kv")
    write(secret, b"s" * 1000)
    os.chmod(secret, 0o600)
    os.chmod(m.p("shared"), 0o1777)  # a sticky, world-writable directory
    os.makedirs(m.p("tenants", "nobody"))
    os.chown(m.p("tenants", "nobody"), 65534, 65534)
    os.setxattr(m.p("tenants", "nobody"), "user.kvfs.quota", b"4M")
    probe = textwrap.dedent(f'''
        import errno, json, os, sys
        import kvfs.tools.main, kvfs.tools.client, kvfs.control, kvfs.mount, kvfs.mounttab, kvfs.catalog, kvfs.warehouse, kvfs.fsck
        kvfs.tools.main.build_parser()  # and what the parser imports
        os.setgid(65534); os.setuid(65534)
        out = {{}}
        def attempt(name, fn):
            try:
                fn()
                out[name] = "ok"
            except OSError as exc:
                out[name] = errno.errorcode[exc.errno]
        def w(path, n):
            with open(path, "wb") as f:
                f.write(os.urandom(n))
        attempt("read", lambda: open({secret!r}, "rb").read())
        attempt("unlink", lambda: os.unlink({secret!r}))
        attempt("unpin", lambda: os.setxattr({secret!r}, "user.kvfs.pin", b"0"))
        attempt("write 3M", lambda: w({m.p("tenants", "nobody", "a")!r}, 3 << 20))
        attempt("write 2M more", lambda: w({m.p("tenants", "nobody", "b")!r}, 2 << 20))
        attempt("raise quota", lambda: os.setxattr({m.p("tenants", "nobody")!r}, "user.kvfs.quota", b"1G"))
        attempt("control", lambda: os.open({m.p(".kvfs", "control")!r}, os.O_RDWR))
        for cmd in (["retire", {secret!r}], ["gc", {m.path!r}], ["ls", {m.path!r}]):
            out[cmd[0]] = kvfs.tools.main.main(cmd)
        print(json.dumps(out))
    ''')
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.splitlines()[-1])
    assert out == {
        "read": "EACCES", "unlink": "EPERM", "unpin": "EACCES", "write 3M": "ok",
        "write 2M more": "EDQUOT", "raise quota": "EPERM", "control": "EACCES",
        "retire": EXIT_PERMISSION, "gc": EXIT_PERMISSION, "ls": EXIT_PERMISSION,
    }, out
    assert open(secret, "rb").read() == b"s" * 1000
    assert os.getxattr(m.p("tenants", "nobody"), "user.kvfs.quota") == str(4 * MiB).encode()
    m.umount()
    assert json.loads(run_kvfs("fsck", m.warehouse, "--json").stdout)["clean"]


def test_quota_counts_what_is_below_and_follows_renames(make_mount):
    m = make_mount()
    os.makedirs(m.p("t", "sub"))
    write(m.p("t", "old"), os.urandom(2 * MiB))
    os.setxattr(m.p("t"), "user.kvfs.quota", b"5M")  # what is there already counts
    write(m.p("t", "sub", "a"), os.urandom(2 * MiB))
    with pytest.raises(OSError) as info:
        write(m.p("t", "sub", "b"), os.urandom(2 * MiB))
    assert info.value.errno == errno.EDQUOT
    os.unlink(m.p("t", "sub", "b"))
    os.rename(m.p("t", "old"), m.p("elsewhere"))  # moving out frees quota
    write(m.p("t", "sub", "b"), os.urandom(2 * MiB))
    with pytest.raises(OSError) as info:
        os.rename(m.p("elsewhere"), m.p("t", "back"))  # ... and moving in counts
        write(m.p("t", "more"), os.urandom(MiB))
    assert info.value.errno == errno.EDQUOT
    with pytest.raises(OSError) as info:
        os.setxattr(m.p("t", "sub", "a"), "user.kvfs.quota", b"1M")  # files have none
    assert info.value.errno == errno.ENOTDIR
    with pytest.raises(OSError) as info:
        os.setxattr(m.p("t"), "user.kvfs.quota", b"lots")
    assert info.value.errno == errno.EINVAL
    os.removexattr(m.p("t"), "user.kvfs.quota")
    write(m.p("t", "more"), os.urandom(MiB))
    m.umount()
    assert json.loads(run_kvfs("fsck", m.warehouse, "--json").stdout)["clean"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_prometheus_metrics_parse_and_match_stats(make_mount):
    port = _free_port()
    m = make_mount(options=[f"metrics_port={port}"])
    write(m.p("a"), os.urandom(3 * MiB))
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    value = lambda name: families[name].samples[0].value  # noqa: E731
    st = json.loads(open(m.p(".kvfs", "stats.json")).read())
    assert value("kvfs_capacity_bytes") == st["capacity"]
    assert value("kvfs_files") == 1 and value("kvfs_file_bytes") == 3 * MiB
    assert families["kvfs_commits"].type == "counter" and value("kvfs_commits") >= 1
    devices = families["kvfs_device_capacity_bytes"].samples
    assert sorted(s.labels["device"] for s in devices) == ["0", "1"]
    # The same text in the control directory, and the endpoint listens on loopback only.
    local = {f.name for f in text_string_to_metric_families(open(m.p(".kvfs", "metrics")).read())}
    assert local == set(families)
    listening = open("/proc/net/tcp").read().splitlines()[1:]
    mine = [line.split()[1] for line in listening
            if line.split()[1].endswith(f":{port:04X}") and line.split()[3] == "0A"]  # LISTEN
    assert mine == [f"0100007F:{port:04X}"], mine
    # Bad ports: a usage error, and a port in use fails the mount.
    other = tempfile.mkdtemp()
    res = run_kvfs("mount", m.warehouse, other, "--metrics-port", "http", check=False)
    assert res.returncode == EXIT_USAGE
    m.umount()
    res = run_kvfs("mount", m.warehouse, other, "-o", f"metrics_port={port}", check=False)
    assert res.returncode == 0  # free again after the unmount
    run_kvfs("umount", other)
    with socket.socket() as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        busy.bind(("127.0.0.1", port))
        busy.listen()
        res = run_kvfs("mount", m.warehouse, other, "--metrics-port", str(port), check=False)
        assert res.returncode == EXIT_MOUNT_FAILED and "metrics" in res.stderr, res.stderr
    os.rmdir(other)


def test_direct_path_is_counted_in_metrics_and_stat(make_mount):
    """Lookups, reads and stores through the direct path (kvfs-direct(7)) show in
    .kvfs/metrics, with their help text, and as the "direct" line of kvfs stat, which a
    warehouse that never used the direct path does not print."""
    m = make_mount()
    assert not re.search(r"^direct ", run_kvfs("stat", m.path).stdout, re.M)
    data = os.urandom(3 * MiB + 5)
    # Found from inside d, which is not there yet: the kernel caches that miss, and the
    # store that makes d (parents) must drop it, or d/a could not be opened below.
    client = direct_client.connect(m.p("d"))
    assert client is not None, "the mount does not serve the direct path"
    try:
        buf = client.buffer(4 * MiB)
        buf.mm[:len(data)] = data
        assert client.write([("d/a", buf, 0, len(data), 0o644), (m.p("d", "b"), buf, 0, MiB, 0o600)]) == [0, 0]
        assert client.lookup(["d/a", "d/nope"]) == [len(data), -errno.ENOENT]
        buf.mm[:len(data)] = bytes(len(data))
        assert client.read([("d/a", 0, 4 * MiB, buf, 0)]) == [len(data)]
        assert buf.mm[:len(data)] == data
        buf.close()
    finally:
        client.close()
    with open(m.p("d", "a"), "rb") as f:
        assert f.read() == data  # the same file through the mount
    families = {f.name: f for f in text_string_to_metric_families(open(m.p(".kvfs", "metrics")).read())}
    expect = {"kvfs_direct_lookups": 2, "kvfs_direct_reads": 1, "kvfs_direct_read_bytes": len(data),
              "kvfs_direct_stores": 2, "kvfs_direct_written_bytes": len(data) + MiB}
    for name, value in expect.items():
        fam = families[name]
        assert fam.type == "counter" and "direct path" in fam.documentation, (name, fam.documentation)
        assert fam.samples[0].value == value, (name, fam.samples)
    line = "direct     1 read (3.0 MiB), 2 stores (4.0 MiB), 2 lookups"
    human = run_kvfs("stat", m.path).stdout
    assert re.search(f"^{re.escape(line)}$", human, re.M), human
    m.umount()
    assert re.search(f"^{re.escape(line)}$", run_kvfs("stat", m.warehouse).stdout, re.M)  # kept over remounts


def test_fsck_finds_and_repairs_planted_metadata_damage(make_mount):
    m = make_mount()
    write(m.p("d", "a"), os.urandom(2 * MiB))
    write(m.p("d", "b"), os.urandom(MiB))
    os.setxattr(m.p("d"), "user.kvfs.quota", b"1G")
    m.umount()
    w = Warehouse(m.warehouse)
    try:
        with w.meta.begin(write=True) as txn:  # plant: wrong totals, quota usage, a dangling entry
            t = w.meta.get_totals(txn)
            t.file_bytes += 12345
            txn.put(M.TOTALS_KEY, t.pack(), db=w.meta.db["totals"])
            d = w.lookup(M.ROOT_INO, b"d").ino
            txn.put(M.ino_key(d), M._QUOTA.pack(1 << 30, 7), db=w.meta.db["quotas"])
            txn.put(M.dentry_key(d, b"ghost"), M.dentry_val(99999, 424242), db=w.meta.db["dentries"])
            cur = txn.cursor(db=w.meta.db["free"])  # and a free extent split in two
            assert cur.last()
            dev, off = M.parse_free_key(cur.key())
            length = M.parse_u64(cur.value())
            txn.put(M.free_key(dev, off), M.u64(MiB), db=w.meta.db["free"])
            txn.put(M.free_key(dev, off + MiB), M.u64(length - MiB), db=w.meta.db["free"])
    finally:
        w.close()
    res = run_kvfs("fsck", m.warehouse, "--json", check=False)
    report = json.loads(res.stdout)
    assert res.returncode == EXIT_FSCK_ERRORS and len(report["problems"]) == 4, report
    # On a terminal fsck shows its progress.
    cmd = " ".join([sys.executable, "-m", "kvfs.tools", "fsck", m.warehouse])
    tty = subprocess.run(["script", "-qec", f"stty cols 100 rows 30; {cmd}", "/dev/null"],
                         capture_output=True, text=True)
    assert "kvfs fsck: checking" in tty.stdout and "records" in tty.stdout
    res = run_kvfs("fsck", m.warehouse, "--repair", "--json")
    assert json.loads(res.stdout)["repaired"] == 4
    assert json.loads(run_kvfs("fsck", m.warehouse, "--json").stdout)["clean"]
    m.mount()
    assert os.path.getsize(m.p("d", "a")) == 2 * MiB
