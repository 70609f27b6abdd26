"""kvfs.lmcache_plugin under LMCache's own StorageManager, which loads it from its config
(storage_plugins: ["kvfs"]): chunks stored in one process are found and loaded, byte for
byte, in another, and again after a remount; the direct path is used on a mount and file
I/O elsewhere; a missing mount makes misses and skipped puts, not errors."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path


HERE = Path(__file__).resolve().parent
SCRIPT = str(HERE / "clients" / "lmcache_plugin_xproc.py")
N = 8


def config(tmp_path: Path, root: str, direct: bool = True) -> Path:
    cfg = tmp_path / f"lmcache-{abs(hash((root, direct)))}.yaml"
    cfg.write_text("chunk_size: 256\nlocal_cpu: false\nmax_local_cpu_size: 0.2\n"
                   'storage_plugins: ["kvfs"]\nextra_config:\n'
                   "  storage_plugin.kvfs.module_path: kvfs.lmcache_plugin\n"
                   "  storage_plugin.kvfs.class_name: KvfsBackend\n"
                   f"  storage_plugin.kvfs.root: {root}\n"
                   f"  storage_plugin.kvfs.direct: {str(direct).lower()}\n")
    return cfg


def run(cfg: Path, mode: str, n: int = N) -> tuple[dict, str]:
    env = {**os.environ, "LMCACHE_CONFIG_FILE": str(cfg)}
    res = subprocess.run([sys.executable, "-X", "faulthandler", SCRIPT, mode, str(n)],
                         capture_output=True, text=True, env=env, timeout=120)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-6000:]
    return json.loads(re.search(r'^\{"plugin".*$', res.stdout, re.M).group(0)), out


LOADED = {"plugin": "KvfsBackend", "hits": N, "by": {"kvfs": N}, "contains_missing": False, "equal": N,
          "positions": True, "get_blocking": True, "get_missing": True, "prefetch": [N, N]}


def test_lmcache_stores_through_the_plugin_and_loads_in_another_process_and_after_a_remount(mnt, tmp_path):
    root = mnt.p("lmcache")
    os.mkdir(root)
    cfg = config(tmp_path, root)
    stored, _ = run(cfg, "store")
    assert stored == {"plugin": "KvfsBackend", "direct": True, "stored": N}
    files = sorted(Path(root).rglob("*.kv"))
    assert len(files) == N and all(f.parent.parent.name == "org--kvfs-plugin-model" for f in files)
    loaded, _ = run(cfg, "load")
    assert loaded == {**LOADED, "direct": True}
    mnt.remount()
    loaded, _ = run(cfg, "load")  # nothing in memory survived: the warehouse is the index
    assert loaded == {**LOADED, "direct": True}
    # The same files through file I/O (a client without the direct path) on the same mount.
    loaded, _ = run(config(tmp_path, root, direct=False), "load")
    assert loaded == {**LOADED, "direct": False}
    # Any safetensors reader opens a chunk.
    from safetensors import safe_open

    with safe_open(str(files[0]), framework="np") as f:
        assert f.metadata()["format"] == "kvfs.lmcache/1" and f.get_slice("kv").get_shape() == [2, 4, 256, 512]


def test_the_plugin_works_outside_kvfs_with_file_io(tmp_path):
    root = tmp_path / "plain"
    root.mkdir()
    cfg = config(tmp_path, str(root))
    assert run(cfg, "store")[0] == {"plugin": "KvfsBackend", "direct": False, "stored": N}
    assert not list(root.rglob("*.tmp"))
    assert run(cfg, "load")[0] == {**LOADED, "direct": False}


def test_a_missing_mount_is_misses_and_skipped_puts_not_errors(make_mount, tmp_path):
    m = make_mount("gone")
    root = m.p("lmcache")
    os.mkdir(root)
    cfg = config(tmp_path, root)
    m.umount()  # root is gone with the mount
    stored, out = run(cfg, "store", 2)
    assert stored == {"plugin": "KvfsBackend", "direct": False, "stored": 0}
    assert "is not a directory (is the kvfs mount there?)" in out
    assert not os.path.exists(root)
    loaded, _ = run(cfg, "load", 2)
    assert loaded["hits"] == 0 and loaded["equal"] == 0 and loaded["prefetch"] == [0, 0]


def test_the_man_page_covers_the_plugin():
    """kvfs-lmcache(7) names every extra_config key the plugin reads, its file format and
    the sections a reader looks for; kvfs(1) and the README point at it."""
    root = HERE.parent
    text = (root / "man" / "kvfs-lmcache.7").read_text().replace("\\-", "-")
    source = (root / "kvfs" / "lmcache_plugin.py").read_text()
    keys = {"module_path", "class_name"} | set(re.findall(r'PREFIX \+ "(\w+)"', source))
    assert {"root", "direct", "staging_mb"} <= keys
    for key in keys:
        assert f"storage_plugin.kvfs.{key}" in text, key
    for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "FILES", "ERRORS", "EXAMPLES", "SEE ALSO"):
        assert f".SH {section}" in text, section
    assert "kvfs.lmcache/1" in text and "KvfsBackend" in text
    assert ".BR kvfs-lmcache (7)" in (root / "man" / "kvfs.1").read_text().replace("\\-", "-")
    assert "storage_plugin.kvfs.root" in (root / "README.md").read_text()
