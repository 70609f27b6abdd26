"""kill -9 of the daemon in the middle of a stream of writes: no torn files, fsck clean."""

import json
import os
import random
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import run_kvfs

WRITER = textwrap.dedent('''
    import os, random, sys
    root, journal, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])

    def content(key, version):
        rng = random.Random(f"{key}/{version}")
        return rng.randbytes(rng.choice([1, 4095, 70000, 1 << 20, 3 << 20]) + version)

    log = open(journal, "a", buffering=1)
    rng = random.Random(seed)
    versions = {}
    i = 0
    try:
        while True:
            i += 1
            style = rng.randrange(3)
            if style == 0:  # vLLM style: O_EXCL temp file, O_DIRECT-free write, rename
                key = f"n{seed}_{i}"
                tmp = os.path.join(root, key + ".tmp")
                fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                os.write(fd, content(key, 0))
                os.close(fd)
                os.replace(tmp, os.path.join(root, key))
                log.write(f"{key} 0\\n")
            elif style == 1:  # plain create + write
                key = f"p{seed}_{i}"
                with open(os.path.join(root, key), "wb") as f:
                    f.write(content(key, 0))
                log.write(f"{key} 0\\n")
            else:  # rewrite one of a few files in place (O_TRUNC), new version each time
                key = f"r{seed}_{rng.randrange(4)}"
                v = versions.get(key, -1) + 1
                log.write(f"start {key} {v}\\n")
                with open(os.path.join(root, key), "wb") as f:
                    f.write(content(key, v))
                versions[key] = v
                log.write(f"{key} {v}\\n")
    except OSError:
        pass  # the daemon died under us
''')


def content(key, version):
    rng = random.Random(f"{key}/{version}")
    return rng.randbytes(rng.choice([1, 4095, 70000, 1 << 20, 3 << 20]) + version)


@pytest.mark.parametrize("trial", range(3))
def test_kill9_during_writes_leaves_no_torn_file(make_mount, tmp_path, trial):
    # Room for everything the writers manage before the kill, and pinned: this test is about
    # crashes, and eviction (which would rightly remove the oldest files) is tested elsewhere.
    m = make_mount(block_size="256K", devices=(("a.img", "1G"), ("b.img", "1G")))
    root = m.p("kv")
    os.mkdir(root)
    os.setxattr(root, "user.kvfs.pin", b"1")
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    journals = [tmp_path / f"journal{k}" for k in range(2)]
    writers = [subprocess.Popen([sys.executable, str(script), root, str(j), str(k + 10 * trial)])
               for k, j in enumerate(journals)]
    time.sleep(random.Random(trial).uniform(0.8, 2.0))
    m.kill9()
    for w in writers:
        w.wait(timeout=60)

    m.mount()  # detaches the dead mount, runs recovery
    completed, started = {}, {}
    for j in journals:
        for line in j.read_text().splitlines():
            parts = line.split()
            if parts[0] == "start":
                started[parts[1]] = int(parts[2])
            elif len(parts) == 2:
                completed[parts[0]] = int(parts[1])
    assert completed, "the writers completed nothing before the kill"
    visible = set(os.listdir(root))
    for key, v in completed.items():
        if key.startswith("r"):
            continue
        assert key in visible, f"{key} was completed before the crash and is gone"
    for name in visible:
        data = open(os.path.join(root, name), "rb").read()
        assert not name.endswith(".tmp") or data == content(name[:-4], 0), f"torn temp file {name}"
        key = name[:-4] if name.endswith(".tmp") else name
        if key.startswith("r"):
            last = started.get(key, completed.get(key, 0))
            ok = data == b"" or any(data == content(key, v) for v in range(last + 1))
            assert ok, f"{name}: {len(data)} bytes match no completed version"
            assert completed.get(key) is None or data == b"" or data in (
                content(key, completed[key]), content(key, last)), f"{name} lost its last completed version"
        else:
            assert data == content(key, 0), f"torn file {name} ({len(data)} bytes)"
    m.umount()
    report = json.loads(run_kvfs("fsck", m.warehouse, "--json", "--verify-data").stdout)
    assert report["clean"], report["problems"]
    with open(os.path.join(m.warehouse, "kvfs.log")) as f:
        assert "recovered after unclean shutdown" in f.read()
