"""kvfs.kv (the native prefix layout) and kvfs.data (training readers) on real mounts."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import run_kvfs
from kvfs.kv import KVStore, chain_hashes, open_chunk

MiB = 1 << 20


def kv_for(tokens, layers=2, heads=4, dim=8, seed=0):
    """KV that is a function of (position, token): the same prefix gives the same KV."""
    t = np.asarray(tokens, dtype=np.float32)
    pos = np.arange(len(tokens), dtype=np.float32)
    base = (t[:, None, None] * 0.001 + pos[:, None, None] * 0.01
            + np.arange(heads * dim, dtype=np.float32).reshape(1, heads, dim) * 0.0001)
    return np.stack([np.stack([base + layer + seed, -base - layer - seed]) for layer in range(layers)]).astype(np.float16)


def test_chain_hashes_are_the_same_in_every_process_and_python():
    tokens = list(range(1, 65))
    golden = chain_hashes(tokens, 16, {"model": "m", "dtype": "float16"})
    # A frozen value: a change of the encoding would silently orphan every cached chunk.
    assert golden[0].hex() == GOLDEN_FIRST, golden[0].hex()
    probe = textwrap.dedent(f'''
        from kvfs.kv import chain_hashes
        print(" ".join(h.hex() for h in chain_hashes({tokens!r}, 16, {{"model": "m", "dtype": "float16"}})))
    ''')
    seen = set()
    for seed in ("0", "1", "12345", "random"):
        res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                             env={**os.environ, "PYTHONHASHSEED": seed}, check=True)
        seen.add(res.stdout.strip())
    assert seen == {" ".join(h.hex() for h in golden)}
    assert len(golden) == 4 and len(set(golden)) == 4
    assert chain_hashes(tokens, 16, {"model": "m", "dtype": "float16", "salt": "tenant-b"}) != golden
    assert chain_hashes(tokens, 16, {"model": "other", "dtype": "float16"})[0] != golden[0]
    assert chain_hashes(tokens[:16] + [0] * 48, 16, {"model": "m", "dtype": "float16"})[0] == golden[0]
    with pytest.raises(ValueError):
        chain_hashes([-1], 1)


GOLDEN_FIRST = "502638dc10f602691696686cf7ec9219"


def test_10000_chunks_lookup_load_and_shared_prefixes_stored_once(mnt):
    store = KVStore(mnt.p("kv"), "tiny-llama", chunk_tokens=16)
    rng = np.random.default_rng(7)
    prompts = [rng.integers(0, 50_000, size=800) for _ in range(200)]  # 200 x 50 chunks
    for p in prompts:
        assert len(store.store(p, kv_for(p))) == 50
    files = [f for _, _, fs in os.walk(store.dir) for f in fs]
    assert len(files) == 10_000 and all(f.endswith(".kv") for f in files)
    for p in prompts[:20]:
        assert store.lookup(p) == 800
        q = p.copy()
        q[333] += 1  # a change in chunk 20: chunks from there on are not cached
        assert store.lookup(q) == 320
        assert store.lookup(np.concatenate([p, q[:40]])) == 800
    # Loading: the stored arrays, mapped; whole prefix; torch on request.
    n, kv = store.load(prompts[3][:500])
    assert n == 496 and np.array_equal(kv, kv_for(prompts[3])[:, :, :496])
    chunks = store.load_chunks(prompts[3])
    assert len(chunks) == 50 and isinstance(chunks[0].k(1), np.memmap)
    assert chunks[1].metadata["parent"] == chunks[0].metadata["chain"]
    assert np.array_equal(chunks[0].tokens, prompts[3][:16])
    import torch

    n, t = store.load(prompts[3], framework="pt")
    assert n == 800 and torch.equal(t, torch.from_numpy(kv_for(prompts[3])))
    # A prompt that shares 40 of its 50 chunks with a stored one adds 10 files, and the
    # warehouse's use grows by those 10 only.
    stats = lambda: json.load(open(mnt.p(".kvfs", "stats.json")))  # noqa: E731
    used = lambda: (lambda st: (st.f_blocks - st.f_bfree) * st.f_frsize)(os.statvfs(mnt.path))  # noqa: E731
    before, used_before = stats(), used()
    variant = np.concatenate([prompts[0][:640], rng.integers(0, 50_000, size=160)])
    store.store(variant, kv_for(variant))
    after = stats()
    assert after["files"] - before["files"] == 10
    chunk_bytes = os.path.getsize(store.paths(prompts[0])[0])
    allocated = -(-chunk_bytes // 4096) * 4096
    assert after["referenced_bytes"] - before["referenced_bytes"] <= 10 * chunk_bytes + 10 * 4096
    assert 0 < used() - used_before <= 10 * allocated  # df: the 40 shared chunks took nothing


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_longest_cached_prefix_is_exact(mnt, data):
    """Prompts that share prefixes: lookup returns exactly the longest whole-chunk prefix
    that some stored prompt has in common with the query."""
    c = 4
    trunk = data.draw(st.lists(st.integers(0, 3), min_size=0, max_size=24))
    branch = st.lists(st.integers(0, 3), min_size=0, max_size=16)
    stored = [trunk[:data.draw(st.integers(0, len(trunk)))] + data.draw(branch) for _ in range(data.draw(st.integers(1, 4)))]
    query = trunk[:data.draw(st.integers(0, len(trunk)))] + data.draw(branch)
    ns = f"ex{abs(hash((str(stored), str(query))))}"
    store = KVStore(mnt.p("prop"), "m", namespace=ns, chunk_tokens=c)
    for s in stored:
        store.store(s, kv_for(s))

    def common(a, b):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    expect = max(min(common(query, s), len(s)) // c * c for s in stored)
    assert store.lookup(query) == expect


WRITER = textwrap.dedent('''
    import sys
    import numpy as np
    sys.path.insert(0, sys.argv[2])
    from test_kv import kv_for
    from kvfs.kv import KVStore
    p = np.arange(4096) % 977
    KVStore(sys.argv[1], "shared", chunk_tokens=64).store(p, kv_for(p))
''')


def test_concurrent_writers_of_the_same_chunks_are_harmless(mnt, tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    here = os.path.dirname(os.path.abspath(__file__))
    procs = [subprocess.Popen([sys.executable, str(script), mnt.p("kv"), here], stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()
    store = KVStore(mnt.p("kv"), "shared", chunk_tokens=64)
    p = np.arange(4096) % 977
    assert store.lookup(p) == 4096
    n, kv = store.load(p)
    assert n == 4096 and np.array_equal(kv, kv_for(p))
    names = [f for _, _, fs in os.walk(store.dir) for f in fs]
    assert len(names) == 64 and not [n for n in names if n.endswith(".tmp")]


def test_lookup_file_answers_a_batch_and_respects_permissions(public_mount):
    mnt = public_mount
    os.makedirs(mnt.p("open", "a"))
    os.makedirs(mnt.p("closed", "b"))
    open(mnt.p("open", "a", "x"), "w").close()
    open(mnt.p("closed", "b", "y"), "w").close()
    os.chmod(mnt.p("closed"), 0o700)
    probe = textwrap.dedent(f'''
        import json, os, sys
        if sys.argv[1] == "nobody":
            os.setgid(65534); os.setuid(65534)
        fd = os.open({mnt.p(".kvfs", "lookup")!r}, os.O_RDWR)
        os.write(fd, json.dumps(["open/a/x", "closed/b/y", "open/a/nope", "../etc", "", "open/a"]).encode())
        print(os.pread(fd, 4096, 0).decode())
    ''')
    as_root = subprocess.run([sys.executable, "-c", probe, "root"], capture_output=True, text=True)
    assert json.loads(as_root.stdout) == [True, True, False, False, False, True]
    as_nobody = subprocess.run([sys.executable, "-c", probe, "nobody"], capture_output=True, text=True)
    assert json.loads(as_nobody.stdout) == [True, False, False, False, False, True], as_nobody.stderr
    fd = os.open(mnt.p(".kvfs", "lookup"), os.O_RDWR)
    os.write(fd, b"not a list")
    with pytest.raises(OSError):
        os.pread(fd, 4096, 0)
    os.close(fd)


def test_training_loop_reads_every_chunk_of_a_model_on_a_read_only_mount(make_mount):
    import torch
    from torch.utils.data import DataLoader

    from kvfs.data import ChunkDataset, iter_chunks, model_dir

    m = make_mount()
    prompts = {}
    for model in ("m1", "m2"):
        store = KVStore(m.p("kv"), model, chunk_tokens=32)
        for i in range(5):
            p = (np.arange(320) * (i + 3) + len(model)) % 30_000
            store.store(p, kv_for(p, seed=i))
            prompts.setdefault(model, []).append((p, i))
    expected = {}
    for p, i in prompts["m1"]:
        kv = kv_for(p, seed=i)
        for c in range(10):
            expected[tuple(p[c * 32:(c + 1) * 32])] = kv[:, :, c * 32:(c + 1) * 32]
    m.umount()
    m.options = ["ro"]
    m.mount()
    directory = model_dir(m.p("kv"), "m1")
    seen = {}
    for tokens, kv in DataLoader(ChunkDataset(directory), batch_size=None, num_workers=2):
        key = tuple(tokens.tolist())
        assert key not in seen  # each chunk once across the workers
        seen[key] = kv
    assert seen.keys() == expected.keys()
    for key, kv in seen.items():
        assert torch.equal(kv, torch.from_numpy(expected[key]))
    with pytest.raises(OSError):
        open(os.path.join(directory, "new.kv"), "wb")  # read-only
    # Chunks that vanish during a walk are skipped, not errors.
    m.umount()
    m.options = []
    m.mount()
    skipped = []
    walk = iter_chunks(directory, skipped=skipped)
    first = next(walk)
    for path in sorted({c.path for c in iter_chunks(directory)} - {first.path})[:7]:
        os.unlink(path)
    assert len(list(walk)) == 50 - 1 - 7 and len(skipped) == 7
    assert isinstance(open_chunk(first.path).k(0), np.memmap)
    run_kvfs("stat", m.path)


def _files_of(store):
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(store.dir) for f in fs)


def test_the_direct_path_and_file_io_store_and_load_the_same_bytes(make_mount, tmp_path):
    """On a mount that serves it kvfs.kv takes the direct path by itself; elsewhere (a
    plain directory, a mount with -o direct=off) the same calls use file I/O. Either way the
    chunk files are the same bytes, safetensors files any reader opens, and a load gives
    what was stored."""
    from safetensors.numpy import load_file

    on, off = make_mount("on"), make_mount("off", options=["direct=off"])
    tokens = np.random.default_rng(3).integers(0, 50_000, size=200)
    kv = kv_for(tokens, layers=3, heads=2, dim=64)
    stores = [KVStore(on.p("kv"), "m", chunk_tokens=32), KVStore(off.p("kv"), "m", chunk_tokens=32),
              KVStore(str(tmp_path / "plain"), "m", chunk_tokens=32),
              KVStore(on.p("kv2"), "m", chunk_tokens=32, direct=False)]
    assert [s.uses_direct_path for s in stores] == [True, False, False, False]
    for s in stores:
        assert len(s.store(tokens, kv)) == 6 and s.lookup(tokens) == 192
    contents = [[open(f, "rb").read() for f in _files_of(s)] for s in stores]
    assert len(contents[0]) == 6 and all(c == contents[0] for c in contents)
    first = load_file(_files_of(stores[0])[0])
    assert first["layer.2.v"].shape == (32, 2, 64)
    for s in stores:
        n, got = s.load(tokens)
        assert n == 192 and got.shape == (3, 2, 192, 2, 64) and np.array_equal(got, kv[:, :, :192])
    st = json.load(open(on.p(".kvfs", "stats.json")))["counters"]
    assert st["direct_stores"] >= 6 and st["direct_read_bytes"] > kv[:, :, :192].nbytes
    assert json.load(open(off.p(".kvfs", "stats.json")))["counters"].get("direct_reads", 0) == 0


def test_a_direct_load_lands_in_the_callers_array_and_keeps_bf16(mnt):
    """load(out=...) reads into an array the caller keeps (from empty() or an earlier load)
    with no copy after the daemon's read; a torch bfloat16 KV goes in and comes out as
    bfloat16, bit for bit; a prefix shorter than `out` fills its start."""
    import torch

    s = KVStore(mnt.p("kv"), "bf", chunk_tokens=16)
    tokens = np.arange(64) + 5
    kv = torch.randn(2, 2, 64, 4, 8).to(torch.bfloat16)
    s.store(tokens, kv)
    n, got = s.load(tokens, framework="pt")
    assert n == 64 and got.dtype == torch.bfloat16 and torch.equal(got, kv)
    out = s.empty((2, 2, 64, 4, 8), np.uint16)
    out[:] = 7
    n, again = s.load(tokens[:40], out=out)  # two whole chunks
    assert n == 32 and np.shares_memory(again, out)
    assert np.array_equal(out[:, :, :32], kv[:, :, :32].view(torch.int16).numpy().view(np.uint16))
    assert (out[:, :, 32:] == 7).all()
    n, on_dev = s.load(tokens, device="cpu")  # the windowed device copy (CUDA: pinned, async)
    assert n == 64 and on_dev.dtype == torch.bfloat16 and torch.equal(on_dev, kv)
    with pytest.raises(ValueError):
        s.load(tokens, out=np.zeros((2, 2, 64, 4, 8), np.uint16))  # not shared memory
    with pytest.raises(ValueError):
        s.load(tokens, out=s.empty((2, 2, 64, 4, 4), np.uint16))  # the wrong shape
    s.close()


def test_big_chunks_are_aligned_and_loaded_past_the_page_cache(mnt, monkeypatch):
    """Chunks of a MiB or more have their tensors 4 KiB-aligned in the file (a padded
    safetensors header), so a direct load reads them with O_DIRECT straight into the
    result; the bytes are the stored ones, and safetensors still reads the files."""
    from safetensors.numpy import load_file

    s = KVStore(mnt.p("kv"), "big", chunk_tokens=128)
    tokens = np.arange(256) + 9
    kv = np.random.default_rng(5).standard_normal((2, 2, 256, 8, 128)).astype(np.float16)
    s.store(tokens, kv)
    path = s.paths(tokens)[1]
    with open(path, "rb") as f:
        (n,) = __import__("struct").unpack("<Q", f.read(8))
    assert (8 + n) % 4096 == 0
    assert np.array_equal(load_file(path)["layer.1.k"], kv[1, 0, 128:256])
    got, out = s.load(tokens)
    assert got == 256 and out.tobytes() == kv.tobytes()
    import kvfs.kv

    got, out = s.load(tokens, out=out)
    assert got == 256 and out.tobytes() == kv.tobytes()
    monkeypatch.setattr(kvfs.kv, "WINDOW_BYTES", 1)  # a device copy per chunk: the same bytes
    got, on_dev = s.load(tokens, device="cpu")
    assert got == 256 and on_dev.numpy().tobytes() == kv.tobytes()
    monkeypatch.setattr(kvfs.kv, "STAGING_BYTES", 1)  # first blocks a chunk at a time too
    got, out = s.load(tokens)
    assert got == 256 and out.tobytes() == kv.tobytes()
    st = json.load(open(mnt.p(".kvfs", "stats.json")))["counters"]
    assert st.get("direct_unbuffered_reads", 0) > 0, st


def test_a_forked_worker_connects_anew_and_the_parent_carries_on(mnt):
    """Inference servers fork workers: a child must not speak over its parent's socket or
    scribble on its parent's shared memory. It connects anew; both then load correctly."""
    s = KVStore(mnt.p("kv"), "fork", chunk_tokens=16)
    tokens = np.arange(64) + 3
    kv = kv_for(tokens)
    s.store(tokens, kv)
    n, first = s.load(tokens)
    pid = os.fork()
    if pid == 0:  # the child: exit code 0 only if it loaded the right bytes on its own connection
        ok = False
        try:
            parent_conn = s._conn
            got, out = s.load(tokens)
            ok = got == 64 and np.array_equal(out, kv) and s._conn is not parent_conn and s.uses_direct_path
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    n, again = s.load(tokens, out=first)
    assert n == 64 and np.array_equal(again, kv)


def test_file_io_loads_bf16_as_bfloat16(tmp_path):
    """Without the direct path (another filesystem), a bfloat16 KV loads back bit for bit:
    chunks map BF16 tensors as their raw 16-bit words, framework="pt" views them as bf16."""
    import torch
    store = KVStore(str(tmp_path), model="m", chunk_tokens=16, direct=False)
    kv = torch.randn(2, 2, 32, 4, 8).to(torch.bfloat16)
    store.store(list(range(32)), kv)
    n, got = store.load(list(range(32)), framework="pt")
    assert n == 32 and got.dtype == torch.bfloat16 and torch.equal(got, kv)
    assert open_chunk(store.paths(list(range(32)))[0]).dtype == "BF16"


def test_one_store_shared_by_a_writer_thread_and_a_loader(mnt):
    """A connector stores from one thread and loads from another through one KVStore: they
    share its staging memory, so they take turns; every load is right and every chunk
    stored reads back as it was given."""
    import threading

    s = KVStore(mnt.p("kv"), "threads", chunk_tokens=16)
    base = np.arange(256) + 11
    kv = kv_for(base, layers=2, heads=4, dim=64)
    s.store(base, kv)
    errors = []

    def writer():
        try:
            for i in range(30):
                t = np.arange(64) + 100_000 + i * 64
                s.store(t, kv_for(t, layers=2, heads=4, dim=64, seed=i))
        except Exception as exc:  # (an assert in a thread would only warn)
            errors.append(exc)

    th = threading.Thread(target=writer)
    th.start()
    for _ in range(30):
        n, got = s.load(base)
        if n != 256 or not np.array_equal(got, kv):
            errors.append("a load returned other bytes")
    th.join()
    assert errors == []
    for i in range(30):
        t = np.arange(64) + 100_000 + i * 64
        n, got = KVStore(mnt.p("kv"), "threads", chunk_tokens=16, direct=False).load(t)
        assert n == 64 and np.array_equal(got, kv_for(t, layers=2, heads=4, dim=64, seed=i)), i


def test_a_forked_child_closing_its_store_leaves_the_parents_alone(mnt):
    s = KVStore(mnt.p("kv"), "forkclose", chunk_tokens=16)
    tokens = np.arange(32) + 3
    kv = kv_for(tokens)
    s.store(tokens, kv)
    n, first = s.load(tokens)
    pid = os.fork()
    if pid == 0:
        try:
            s.close()  # (before anything else: nothing of it may reach the parent's connection)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    n, again = s.load(tokens, out=first)
    assert n == 32 and np.array_equal(again, kv) and s.uses_direct_path
