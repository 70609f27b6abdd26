"""The kvfs command: exit codes and one-line messages for bad input, fstab form, fsck."""

import argparse
import json
import os
import subprocess

import pytest

from conftest import KVFS, Mount, daemon_pid, pid_alive, run_kvfs
from kvfs.tools.argtypes import parse_size
from kvfs.tools.main import main
from kvfs.errors import (
    EXIT_DEVICE, EXIT_EXISTS, EXIT_IN_USE, EXIT_MOUNT_FAILED, EXIT_NO_WAREHOUSE, EXIT_NOT_MOUNTED,
    EXIT_PIPE, EXIT_USAGE,
)

MAN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "man")


def test_parse_size():
    assert parse_size("4096") == 4096
    assert parse_size("64M") == 64 << 20
    assert parse_size("200G") == 200 << 30
    assert parse_size("1.5GiB") == 3 << 29
    for bad in ("", "abc", "-1", "0", "12Q"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_size(bad)


def test_mkfs_refuses_existing_and_bad_input(tmp_path, capsys):
    wh = tmp_path / "w"
    assert main(["mkfs", str(wh), "--size", "64M"]) == 0
    assert os.path.getsize(wh / "data0.img") == 64 << 20
    assert main(["mkfs", str(wh), "--size", "64M"]) == EXIT_EXISTS
    err = capsys.readouterr().err
    assert "already holds a warehouse" in err and "Traceback" not in err
    assert main(["mkfs", str(wh), "--size", "32M", "--force"]) == 0
    assert main(["mkfs", str(tmp_path / "x"), "--block-size", "3K"]) == EXIT_USAGE
    assert main(["mkfs", str(tmp_path / "x"), "--size", "lots"]) == EXIT_USAGE
    assert main(["mkfs", str(tmp_path / "y"), "--size", "1M"]) == 9  # too small a device
    assert "too small" in capsys.readouterr().err


def test_a_failed_mkfs_leaves_nothing_it_made(tmp_path, capsys):
    """Every way mkfs can fail after it started making things: what it made goes, what was
    there before stays (a directory and what is in it, a device file, what --force reuses)."""
    # A new directory (and its new parent) with a default device that is too small.
    assert main(["mkfs", str(tmp_path / "new" / "w"), "--size", "1K"]) == EXIT_DEVICE
    assert "too small" in capsys.readouterr().err and not (tmp_path / "new").exists()
    # A directory that was there, with a file of its own.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes").write_text("mine")
    assert main(["mkfs", str(mine), "--size", "1K"]) == EXIT_DEVICE
    assert os.listdir(mine) == ["notes"]
    # A first device made (in directories made for it), a second one that was there and is
    # too small: the first goes with its directories, the second stays as it was.
    old = tmp_path / "old.img"
    old.write_bytes(b"old" * 1000)
    args = ["--device", f"{tmp_path}/devs/a/a.img:64M", "--device", "b.img:64M", "--device", str(old)]
    assert main(["mkfs", str(mine), *args]) == EXIT_DEVICE
    assert "too small" in capsys.readouterr().err
    assert not (tmp_path / "devs").exists() and os.listdir(mine) == ["notes"]
    assert old.read_bytes() == b"old" * 1000
    # --force over a warehouse: the device file it reuses stays, the one it made goes.
    wh = tmp_path / "w"
    assert main(["mkfs", str(wh), "--size", "64M"]) == 0
    assert main(["mkfs", str(wh), "--force", "--device", "data0.img", "--device", "more.img:1K"]) == EXIT_DEVICE
    assert os.path.getsize(wh / "data0.img") == 64 << 20 and not (wh / "more.img").exists()
    assert not (wh / "meta").exists()  # --force had replaced the old warehouse's
    capsys.readouterr()


def test_a_negative_size_is_refused_as_such(tmp_path, capsys):
    """`--size -5G` is a value, not an unknown option: the message gives the real reason."""
    for args in (["--size", "-5G"], ["--size=-5G"], ["--device", "a.img:-5G"], ["--block-size", "-1M"]):
        assert main(["mkfs", str(tmp_path / "w"), *args]) == EXIT_USAGE, args
        err = capsys.readouterr().err
        assert f"a size must be positive: '{args[-1].rpartition('=')[2].rpartition(':')[2]}'" in err, err
        assert "expected one argument" not in err and not (tmp_path / "w").exists()
    assert main(["find", str(tmp_path), "--min-size", "-1"]) == EXIT_USAGE
    assert "a size must be positive: '-1'" in capsys.readouterr().err
    # Negative numbers reach their parsers now: each refuses what it cannot mean.
    for grace in ("-1", "nan", "inf"):
        assert main(["gc", str(tmp_path), "--grace", grace]) == EXIT_USAGE, grace
        assert f"seconds must be a finite number >= 0: '{grace}'" in capsys.readouterr().err


def exit_status_codes(page: str) -> set[int]:
    """The codes a man page's EXIT STATUS section lists."""
    with open(os.path.join(MAN, page)) as f:
        text = f.read()
    section = text.split(".SH EXIT STATUS", 1)[1].split("\n.SH ", 1)[0]
    return {int(line[3:]) for line in section.splitlines() if line[3:].isdigit() and line.startswith(".B ")}


def test_a_path_that_is_no_kvfs_thing_gets_one_code_per_kind_of_tool(tmp_path, capsys):
    """A plain directory given where a mount or a warehouse is expected. A tool that can
    work on an unmounted warehouse says the path is none (EXIT_NO_WAREHOUSE), in one
    wording; a tool that works only through a running mount says the path is on none
    (EXIT_NOT_MOUNTED). Each tool's man page lists the code it gives."""
    plain = tmp_path / "plain"
    plain.mkdir()
    mp = f"{plain} is neither a kvfs mount point nor a warehouse"
    inside = f"{plain} is neither inside a kvfs mount nor a warehouse"
    expected = {
        "stat": (EXIT_NO_WAREHOUSE, mp), "gc": (EXIT_NO_WAREHOUSE, mp), "tune": (EXIT_NO_WAREHOUSE, mp),
        "ls": (EXIT_NO_WAREHOUSE, inside), "find": (EXIT_NO_WAREHOUSE, inside), "du": (EXIT_NO_WAREHOUSE, inside),
        "fsck": (EXIT_NO_WAREHOUSE, f"{plain} is not a kvfs warehouse (no meta/)"),
        "retire": (EXIT_NOT_MOUNTED, f"{plain} is not inside a kvfs mount"),
        "pin": (EXIT_NOT_MOUNTED, f"{plain} is not inside a kvfs mount"),
        "unpin": (EXIT_NOT_MOUNTED, f"{plain} is not inside a kvfs mount"),
        "umount": (EXIT_NOT_MOUNTED, f"{plain} is not a kvfs mount point"),
    }
    for tool, (code, message) in expected.items():
        for path in (plain, tmp_path / "absent"):
            assert main([tool, str(path)]) == code, (tool, path)
            assert capsys.readouterr().err == f"kvfs {tool}: {message}\n".replace(str(plain), str(path)), (tool, path)
        page = "kvfs-pin.8" if tool == "unpin" else f"kvfs-{tool}.8"
        listed = exit_status_codes(page)
        other = EXIT_NOT_MOUNTED if code == EXIT_NO_WAREHOUSE else EXIT_NO_WAREHOUSE
        assert code in listed, (page, listed)
        if tool not in ("stat", "gc", "tune"):  # these give 7 when a mount goes away meanwhile
            assert other not in listed, (page, listed)


def test_a_reader_that_goes_away_ends_each_tool_quietly(make_mount):
    """`kvfs find ... | head -1` as coreutils do it: no message, and the status a shell
    gives a command that SIGPIPE ended, which a `set -o pipefail` script tells apart from
    every failure (EXIT_PIPE, 141). For find, ls and du the reader takes one line of more
    than a pipe holds, then closes; stat, gc and tune print less, so their reader is gone
    before they write (their output then fails at the last flush)."""
    m = make_mount()
    names = m.p("many")
    os.mkdir(names)
    for i in range(600):  # 600 lines of over 200 bytes from each of find, ls and du
        open(os.path.join(names, f"{i:04d}" + "n" * 200), "w").close()

    def ends_quietly(args, lines):
        proc = subprocess.Popen([*KVFS, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            got = [proc.stdout.readline() for _ in range(lines)]
            proc.stdout.close()
            err = proc.stderr.read()
            assert proc.wait(timeout=60) == EXIT_PIPE and err == b"", (args, proc.returncode, err)
            assert all(got), (args, got)
        finally:
            proc.kill()
            proc.wait()

    for args in (["find", m.path], ["find", m.path, "--json"], ["ls", names], ["du", names],
                 ["du", names, "--json"], ["find", m.warehouse, "--long"]):
        ends_quietly(args, 1)
    for args in (["stat", m.path], ["stat", m.path, "--json"], ["gc", m.path], ["tune", m.path]):
        ends_quietly(args, 0)
    # In a shell pipeline, with pipefail: 141 from kvfs, nothing on stderr, head's line.
    res = subprocess.run(["bash", "-c", 'set -o pipefail; "$@" | head -1', "-", *KVFS, "find", m.path],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == EXIT_PIPE and res.stderr == "" and res.stdout == m.path + "\n", res


def test_mount_errors(tmp_path, make_mount):
    assert run_kvfs("mount", tmp_path / "nowhere", tmp_path, check=False).returncode == EXIT_NO_WAREHOUSE
    m = make_mount()
    # The same warehouse twice, and the same mount point twice.
    other = tmp_path / "other"
    other.mkdir()
    res = run_kvfs("mount", m.warehouse, other, check=False)
    assert res.returncode == EXIT_IN_USE and "in use" in res.stderr
    res = run_kvfs("mount", m.warehouse, m.path, check=False)
    assert res.returncode == EXIT_MOUNT_FAILED and "already a kvfs mount point" in res.stderr
    res = run_kvfs("mount", m.warehouse, tmp_path / "nodir", check=False)
    assert res.returncode in (EXIT_IN_USE, EXIT_MOUNT_FAILED)
    res = run_kvfs("mount", m.warehouse, other, "-o", "compress=lz4", check=False)
    assert res.returncode == EXIT_USAGE
    # fsck refuses a mounted warehouse; umount of something else is refused.
    res = run_kvfs("fsck", m.warehouse, check=False)
    assert res.returncode == EXIT_IN_USE
    res = run_kvfs("umount", other, check=False)
    assert res.returncode == EXIT_NOT_MOUNTED and "not a kvfs mount point" in res.stderr
    # umount of a busy mount point says so and keeps serving.
    f = open(m.p("busy"), "w")
    try:
        res = run_kvfs("umount", m.path, check=False)
        assert res.returncode == EXIT_MOUNT_FAILED
        assert os.path.exists(m.p("busy"))
    finally:
        f.close()
    m.umount()
    assert json.loads(run_kvfs("fsck", m.warehouse, "--json").stdout)["clean"]


def test_fstab_style_invocation_and_options(make_warehouse, tmp_path):
    """mount.fuse3 runs 'kvfs SOURCE MOUNTPOINT -o OPTS' for an fstab line of type fuse.kvfs."""
    wh = make_warehouse()
    mp = tmp_path / "fstab-mnt"
    mp.mkdir()
    m = Mount(wh, mp)
    try:
        res = subprocess.run([*KVFS, str(wh), str(mp), "-o", "rw,_netdev,x-systemd.automount,allow_other,compress=zstd"],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        m.pid = daemon_pid(str(wh))
        with open("/proc/self/mountinfo") as f:
            line = next(line for line in f if f" {mp} " in line)
        assert "fuse.kvfs" in line and str(wh) in line
        assert "allow_other" in line
        data = b"\0\1" * (1 << 20)  # compressible: stored zstd-compressed
        with open(m.p("z"), "wb") as f:
            f.write(data)
        st = os.statvfs(m.path)
        assert (st.f_blocks - st.f_bfree) * st.f_frsize < 256 << 10
        m.umount()
        m.mount()
        assert open(m.p("z"), "rb").read() == data
        m.umount()
    finally:
        m.cleanup()


def test_mount_dot_fuse_helper(make_warehouse, tmp_path):
    """A real `mount -t fuse.kvfs` (the fstab path) through mount.fuse3."""
    wh = make_warehouse()
    mp = tmp_path / "mnt-helper"
    mp.mkdir()
    # mount(8) runs helpers with a clean PATH: kvfs must be in /usr/local/bin (the
    # quickstart links it there). Link this checkout's kvfs for the test, then restore.
    link = "/usr/local/bin/kvfs"
    ours = os.path.join(os.path.dirname(KVFS[0]), "kvfs")
    saved = os.readlink(link) if os.path.islink(link) else None
    assert saved is not None or not os.path.exists(link), f"{link} is not a symlink"
    if saved is not None:
        os.unlink(link)
    os.symlink(ours, link)
    env = dict(os.environ)
    m = Mount(wh, mp)
    try:
        res = subprocess.run(["mount", "-t", "fuse.kvfs", str(wh), str(mp), "-o", "defaults"],
                             capture_output=True, text=True, env=env, timeout=60)
        assert res.returncode == 0, res.stderr
        m.pid = daemon_pid(str(wh))
        assert pid_alive(m.pid)
        with open(m.p("f"), "w") as f:
            f.write("via fstab")
        m.umount()
        m.mount()
        assert open(m.p("f")).read() == "via fstab"
    finally:
        m.cleanup()
        os.unlink(link)
        if saved is not None:
            os.symlink(saved, link)


def test_fsck_finds_and_repairs_a_planted_leak(make_warehouse):
    wh = make_warehouse()
    from kvfs import meta as M
    from kvfs.warehouse import Warehouse

    w = Warehouse(str(wh))
    fh, inode = w.create(M.ROOT_INO, b"f", 0o644, 0, 0)
    w.write(fh, 0, os.urandom(3 << 20))
    w.release(fh)
    # Plant a leak: take an extent out of the free map that no block uses.
    with w.meta.begin(write=True) as txn:
        w.meta.free_remove(txn, 1, 200 << 20, 1 << 20)
    w.close()
    res = run_kvfs("fsck", wh, check=False)
    assert res.returncode == 8 and "leaked" in res.stdout
    res = run_kvfs("fsck", wh, "--repair", check=False)
    assert res.returncode == 0 and "repaired" in res.stdout
    res = run_kvfs("fsck", wh, "--verify-data", "--json")
    assert json.loads(res.stdout)["clean"]


def test_man_pages_cover_every_command_and_option():
    """Every subcommand has a page (unpin shares pin's) that names each of its options and
    is listed in kvfs(1); a page cannot silently fall behind --help."""
    from pathlib import Path

    from kvfs.tools.main import SUBCOMMANDS, build_parser

    man = Path(__file__).resolve().parent.parent / "man"
    overview = (man / "kvfs.1").read_text().replace("\\-", "-")
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert sorted(sub.choices) == sorted(SUBCOMMANDS)
    for name, parser in sub.choices.items():
        page = "pin" if name == "unpin" else name
        text = (man / f"kvfs-{page}.8").read_text().replace("\\-", "-")
        assert f"kvfs-{page} (8)" in overview.replace(".BR ", "")
        assert f"kvfs {name}" in text
        for action in parser._actions:
            if action.help != argparse.SUPPRESS:
                for opt in action.option_strings:
                    assert opt in text, f"kvfs-{page}.8 does not mention {opt}"
        for section in ("NAME", "SYNOPSIS", "OPTIONS", "EXAMPLES", "EXIT STATUS", "FILES", "SEE ALSO"):
            assert f".SH {section}" in text, f"kvfs-{page}.8 has no {section}"


def test_the_direct_path_page_covers_its_protocol():
    """kvfs-direct(7) names every operation the daemon serves, every limit with its value,
    and the sections a reader looks for; the mount's page has the option and every file of
    the control directory; kvfs(1) points at the page."""
    import re
    from pathlib import Path

    from kvfs import control, direct, direct_server
    from kvfs.fs import VIRTUAL_NAMES

    man = Path(__file__).resolve().parent.parent / "man"
    text = (man / "kvfs-direct.7").read_text().replace("\\-", "-").replace("\\(dq", '"')
    ops = sorted(n[4:] for n in vars(direct_server.DirectServer) if n.startswith("_op_"))
    assert {"hello", "buffer", "lookup", "read", "write"} <= set(ops)  # the scan finds them
    for op in ops:
        assert f'"op": "{op}"' in text, op
    limits = {"MAX_REQUEST": "256 MiB", "MAX_ITEMS": f"{direct.MAX_ITEMS}", "MAX_BUFFERS": f"{direct_server.MAX_BUFFERS} buffers",
              "MAX_PEERS": f"{direct_server.MAX_PEERS} connections"}
    assert direct_server.MAX_REQUEST == 256 << 20
    for name, value in limits.items():
        assert re.search(rf"^\.B {name}\n{value}", text, re.M), name
    for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "OPERATIONS", "BUFFERS", "PERMISSIONS", "ERRORS",
                    "STORES", "LIMITS", "FALLBACK", "EXAMPLES", "FILES", "SEE ALSO"):
        assert f".SH {section}" in text, section
    for err in ("EACCES", "ENOENT", "EISDIR", "EFAULT", "EINVAL", "ENAMETOOLONG", "EROFS", "ENOSPC", "EDQUOT",
                "EIO", "EPERM", "EMSGSIZE", "EMFILE"):
        assert f".B {err}" in text, err
    mount = (man / "kvfs-mount.8").read_text().replace("\\-", "-")
    assert ".BR direct= { on | off }" in mount and "kvfs-direct (7)" in mount
    section = mount.split(".SH CONTROL DIRECTORY", 1)[1].split("\n.SH ", 1)[0]
    for name in VIRTUAL_NAMES:
        assert f".I {control.CONTROL_DIR}/{name.decode()}\n" in section, name
    assert ".BR kvfs-direct (7)" in (man / "kvfs.1").read_text().replace("\\-", "-")
    vllm = text.split(".SH VLLM CONNECTOR", 1)[1].split("\n.SH ", 1)[0]
    for key in ("root", "model", "revision", "namespace", "chunk_tokens", "salt", "store"):
        assert f".B {key}\n" in vllm, key  # every key kvfs.vllm_connector reads
    src = (man.parent / "kvfs" / "vllm_connector.py").read_text()
    assert set(re.findall(r'cfg\.get\("(\w+)"', src)) == {"root", "model", "revision", "namespace", "chunk_tokens",
                                                           "salt", "store"}


def test_each_tool_runs_on_its_own_in_process(tmp_path, capsys):
    """Every subcommand is a module of kvfs.tools with main(argv=None) -> int, callable
    without the dispatcher, with the same messages and exit codes."""
    from kvfs.tools import du, find, fsck, gc, ls, main as dispatcher, mkfs, pin, stat, tune, umount

    assert [t.__name__.rpartition(".")[2] for t in dispatcher.TOOLS] == list(dispatcher.SUBCOMMANDS)
    wh = str(tmp_path / "w")
    assert mkfs.main([wh, "--size", "64M", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["devices"][0]["size"] == 64 << 20
    assert tune.main([wh, "--high-watermark", "85%", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["high_watermark"] == 0.85
    assert stat.main([wh, "--json"]) == 0 and json.loads(capsys.readouterr().out)["files"] == 0
    for tool in (gc, fsck, ls, du, find):
        assert tool.main([wh]) == 0, tool
    assert "kvfs fsck: 1 inode, 0 entries, 0 blocks: clean\n" in capsys.readouterr().out
    assert umount.main([str(tmp_path)]) == EXIT_NOT_MOUNTED
    assert pin.main([wh]) == EXIT_NOT_MOUNTED
    assert mkfs.main([wh]) == EXIT_EXISTS
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"kvfs umount: {tmp_path} is not a kvfs mount point"
    assert err[1] == f"kvfs pin: {wh} is not inside a kvfs mount" and err[2].startswith("kvfs mkfs: ")
    assert mkfs.main(["--bogus"]) == EXIT_USAGE


def test_bench_runs_every_workload_and_reports_ratios():
    """The quick benchmark runs every workload against kvfs and the raw disk and reports
    both figures: it cannot rot. (Timings are for BENCHMARKS.md, not asserted here.)"""
    from kvfs.tools.bench import WORKLOADS

    res = run_kvfs("bench", "--scale", "quick", "--json", timeout=600)
    report = json.loads(res.stdout)
    rows = report["rows"]
    assert len(rows) >= 15
    names = " ".join(r["workload"] for r in rows)
    for word in ("write 2 MiB", "read 32 MiB files, cold", "O_DIRECT", "vLLM tier", "lookup miss",
                 "4 readers", "space"):
        assert word in names, word
    for r in rows:
        assert r["raw"] and r["kvfs"] and r["ratio"] > 0, r
    assert report["machine"]["cpus"] == os.cpu_count() and len(WORKLOADS) == 7
    assert "| workload |" in run_kvfs("bench", "--scale", "quick", "--only", "space", "--markdown").stdout


def test_fusefloor_mounts_a_null_filesystem_and_reports_each_workload(tmp_path):
    """scripts/fusefloor.py (the pyfuse3 floor printed in BENCHMARKS.md) runs: it mounts
    its null filesystem for real, measures it and the raw disk, and unmounts."""
    import sys

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "fusefloor.py")
    res = subprocess.run([sys.executable, script, "--scale", "quick", "--markdown", "--dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    rows = [line.split("|")[1:-1] for line in res.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    wanted = ("create,", "lookup hit", "lookup miss", "read 32 MiB files, cold", "read 32 MiB files, warm",
              "read 2 MiB files, warm")
    assert len(rows) == len(wanted)
    for want, r in zip(wanted, rows):
        assert r[0].strip().startswith(want), r
    for r in rows:
        assert float(r[2].replace(",", "")) > 0 and float(r[3].replace(",", "")) > 0, r
    with open("/proc/self/mountinfo") as f:
        assert str(tmp_path) not in f.read()  # unmounted again
    assert os.listdir(tmp_path) == []  # and cleaned up


def test_abread_interleaves_cold_reads_through_two_mounts_and_a_raw_directory(make_mount, tmp_path):
    """scripts/abread.py (the A/B of two daemon versions behind BENCHMARKS.md's cold-read
    figures) reads through real mounts and a raw directory, alternating, and reports each."""
    import sys

    a, b = make_mount("a"), make_mount("b")
    raw = tmp_path / "raw"
    raw.mkdir()
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "abread.py")
    res = subprocess.run([sys.executable, script, "--side", f"a={a.path}", "--side", f"b={b.path}",
                          "--side", f"raw={raw}", "--size-mib", "2", "--total-mib", "8", "--reps", "2", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["files"] == 4 and set(out["sides"]) == {"a", "b", "raw"}
    for side in out["sides"].values():
        assert len(side["samples"]) == 2 and side["median_mbps"] > 0
    for d in (a.path, b.path, str(raw)):
        assert sorted(os.listdir(os.path.join(d, "abread-2"))) == [f"f{i:06d}" for i in range(4)]
    bad = subprocess.run([sys.executable, script, "--side", f"a={a.path}"], capture_output=True, text=True)
    assert bad.returncode == 2 and "two or more --side" in bad.stderr
