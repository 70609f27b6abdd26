"""The set-up scripts as a new user runs them, for real: scripts/setup.sh (quiet when there
is nothing to do), scripts/test.sh (arguments select tests as with pytest) and
scripts/quickstart.sh (which kvfs a bare `kvfs` runs)."""

import os
import subprocess
import sys

from conftest import find_mount, run_kvfs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOAK = "tests/test_soak.py"


def bash(script, *args, cwd=ROOT, env=None, timeout=240, script_dir=ROOT):
    res = subprocess.run(["bash", os.path.join(script_dir, "scripts", script), *args], cwd=cwd,
                         capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    return res, res.stdout + res.stderr


def test_setup_says_nothing_when_nothing_needs_doing():
    res, out = bash("setup.sh", env={"KVFS_SKIP_CLIENTS": "1"})
    assert res.returncode == 0 and out == "", out


def test_setup_makes_a_half_made_venv_again(tmp_path):
    """Without Debian's python3-venv, `python3 -m venv` fails after making .venv/bin/python:
    setup removes what that left, and takes a .venv without pip (an older setup's leftover)
    for what it is and makes it again, rather than skipping it for pip to fail in."""
    tree = tmp_path / "checkout"
    (tree / "scripts").mkdir(parents=True)
    for name in ("scripts/setup.sh", "pyproject.toml"):
        subprocess.run(["cp", os.path.join(ROOT, name), tree / name], check=True)
    python = tmp_path / "python3-without-venv"  # the failure, after bin/python, as Debian's
    python.write_text('#!/bin/sh\nif [ "$1 $2" = "-m venv" ]; then python3 -m venv --without-pip "$3"; '
                      'echo "ensurepip is not available" >&2; exit 1; fi\nexec python3 "$@"\n')
    python.chmod(0o755)
    env = {"KVFS_SKIP_CLIENTS": "1", "PYTHON": str(python)}
    res, out = bash("setup.sh", cwd=tree, env=env, script_dir=tree)
    assert res.returncode == 1 and "setup: creating .venv (about 10 s)... failed" in out, out
    assert "ensurepip is not available" in out and not (tree / ".venv").exists(), out
    subprocess.run(["python3", "-m", "venv", "--without-pip", tree / ".venv"], check=True)
    res, out = bash("setup.sh", cwd=tree, env=env, script_dir=tree)
    assert out.startswith("setup: .venv is incomplete (no python or no pip in it): making it again\n"), out
    assert res.returncode == 1 and "creating .venv (about 10 s)... failed" in out, out
    assert not (tree / ".venv").exists()


def collected(out):
    """The node ids `pytest --collect-only -q` listed."""
    return [line for line in out.splitlines() if "::" in line and not line.startswith(("ERROR", "FAILED"))]


def test_test_sh_paths_and_node_ids_select_as_pytest_does(tmp_path):
    # Each inner run also names what it wants by option (--collect-only, -k): a test.sh that
    # ignored the path would not run the whole suite, this test included, again.
    # A file, from the checkout's root and from tests/ (paths are the caller's): that file's
    # tests, and only those.
    for cwd, arg in ((ROOT, SOAK), (os.path.join(ROOT, "tests"), os.path.basename(SOAK))):
        res, out = bash("test.sh", arg, "--collect-only", "-q", "-p", "no:cacheprovider", cwd=cwd)
        ids = collected(out)
        assert res.returncode == 0 and len(ids) >= 3, out[-3000:]
        assert all(i.startswith(SOAK + "::") for i in ids), ids

    # A node id, run for real (a test that is not this one).
    name = "test_soak_retire_expects_only_the_race"
    res, out = bash("test.sh", f"{SOAK}::{name}", "-k", name, "-v", "-p", "no:cacheprovider",
                    "--basetemp", str(tmp_path / "inner"))
    assert res.returncode == 0, out[-3000:]
    assert "collected 1 item\n" in out and f"{SOAK}::{name} PASSED" in out and " 1 passed" in out, out[-3000:]

    # A mistyped path selects nothing (pytest says so); it does not run the whole suite.
    res, out = bash("test.sh", "tests/test_no_such_file.py", "--collect-only", "-p", "no:cacheprovider")
    assert res.returncode == 4 and "file or directory not found" in out and "no tests collected" in out, out[-3000:]


def test_test_sh_options_alone_run_the_whole_suite():
    whole = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                            "tests"], cwd=ROOT, capture_output=True, text=True, timeout=240)
    everything = collected(whole.stdout)
    assert whole.returncode == 0 and len({i.split("::")[0] for i in everything}) > 5, whole.stdout[-3000:]

    res, out = bash("test.sh", "-k", "test_soak_script_briefly", "--collect-only", "-q", "-p", "no:cacheprovider")
    assert res.returncode == 0 and collected(out) == [f"{SOAK}::test_soak_script_briefly"], out[-3000:]
    assert f"1/{len(everything)} tests collected ({len(everything) - 1} deselected)" in out, out[-3000:]


def test_quickstart_points_a_stale_kvfs_link_here_and_leaves_others_alone(tmp_path):
    kvfs = os.path.join(ROOT, ".venv", "bin", "kvfs")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    link = bin_dir / "kvfs"
    mnt = tmp_path / "mnt"
    env = {"KVFS_LINK": str(link), "KVFS_WAREHOUSE": str(tmp_path / "wh"), "KVFS_MOUNT": str(mnt),
           "KVFS_SIZE": "64M", "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    try:
        # An older checkout's link (gone since): pointed at this checkout.
        os.symlink("/srv/old-clone/.venv/bin/kvfs", link)
        res, out = bash("quickstart.sh", env=env)
        assert res.returncode == 0, out
        assert os.readlink(link) == kvfs
        assert f"kvfs: {link} -> {kvfs} (was -> /srv/old-clone/.venv/bin/kvfs)" in out, out
        assert f"Unmount with:  kvfs umount {mnt}" in out, out
        assert "setup:" not in out, out  # installed already: nothing to say

        # Again: the link is right, the warehouse mounted; both said in a line.
        res, out = bash("quickstart.sh", env=env)
        assert res.returncode == 0 and f"kvfs: {link} -> {kvfs}\n" in out and "already mounted" in out, out

        # Not a kvfs link of ours: left alone, and how to call this checkout's kvfs instead.
        for other in ("file", "link"):
            os.unlink(link)
            if other == "file":
                link.write_text("#!/bin/sh\necho some other kvfs\n")
            else:
                os.symlink("/opt/vendor/bin/kvfs", link)
            res, out = bash("quickstart.sh", env=env)
            assert res.returncode == 0, out
            what = "a regular file" if other == "file" else "a link to /opt/vendor/bin/kvfs"
            assert (f"kvfs: {link} is {what}, not a kvfs checkout's: left alone; "
                    f"call this checkout's kvfs as {kvfs}\n") in out, out
            assert f"Unmount with:  {kvfs} umount {mnt}" in out, out
            if other == "file":
                assert link.read_text() == "#!/bin/sh\necho some other kvfs\n"
            else:
                assert os.readlink(link) == "/opt/vendor/bin/kvfs"
    finally:
        if find_mount(str(mnt), resolve=False) is not None:
            run_kvfs("umount", mnt, check=False)
        if find_mount(str(mnt), resolve=False) is not None:
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
