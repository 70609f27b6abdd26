"""The set-up scripts as a new user runs them, for real: scripts/setup.sh (quiet when there
is nothing to do), scripts/test.sh (arguments select tests as with pytest) and
scripts/quickstart.sh (which kvfs a bare `kvfs` runs)."""

import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bash(script, *args, cwd=ROOT, env=None, timeout=240):
    res = subprocess.run(["bash", os.path.join(ROOT, "scripts", script), *args], cwd=cwd,
                         capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    return res, res.stdout + res.stderr


def test_setup_says_nothing_when_nothing_needs_doing():
    res, out = bash("setup.sh", env={"KVFS_SKIP_CLIENTS": "1"})
    assert res.returncode == 0 and out == "", out
