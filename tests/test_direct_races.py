"""The direct path (kvfs.direct_client) raced, on real mounts."""

import json
import os
import threading

from kvfs import direct_client

BS = 256 << 10  # the warehouses' block size here


def stats(m) -> dict:
    with open(m.p(".kvfs", "stats.json")) as f:
        return json.load(f)



def test_a_read_into_changing_memory_never_quarantines_a_healthy_block(make_mount):
    """Raw blocks read whole land in the caller's memory and are verified there. Memory the
    caller changes meanwhile (items of one batch aimed at the same range, or its own
    threads writing its buffer) must not make a healthy block look damaged: that would
    drop the files that hold it (quarantine), for every user of the mount."""
    m = make_mount(block_size="256K")
    client = direct_client.connect(m.path)
    files = {f"f{i}": os.urandom(4 * BS) for i in range(4)}
    src = client.buffer(16 * BS)
    for i, data in enumerate(files.values()):
        src.mm[i * 4 * BS:(i + 1) * 4 * BS] = data
    assert client.write([(name, src, i * 4 * BS, 4 * BS, 0o644) for i, name in enumerate(files)]) == [0] * 4
    dest = client.buffer(BS)
    stop = threading.Event()

    def scribble():  # the client's own thread writing its buffer while reads land in it
        while not stop.is_set():
            dest.mm[:4096] = os.urandom(4096)

    t = threading.Thread(target=scribble, daemon=True)
    t.start()
    try:
        for _ in range(20):  # 16 blocks at once, all into the same range
            results = client.read([(name, b * BS, BS, dest, 0) for name in files for b in range(4)])
            assert results == [BS] * 16, results
    finally:
        stop.set()
        t.join()
    counters = stats(m)["counters"]
    assert not counters.get("corrupt_blocks") and not counters.get("quarantined_files"), counters
    for name, data in files.items():  # every file is still there, whole
        with open(m.p(name), "rb") as f:
            assert f.read() == data, name
    client.close()
