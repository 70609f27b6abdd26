"""Crashes: kill -9 of the daemon and simulated power cuts under a mixed workload, through the
crash harness (scripts/crashtest.py; its long run is 200 trials). Each trial mounts again
(recovery), checks every visible file against the writers' journals (complete versions only,
nothing promised lost) and runs fsck --verify-data; also with clients of the direct path
storing batches."""

import json
import os
import subprocess
import sys
import time

HARNESS = os.path.join(os.path.dirname(__file__), "..", "scripts", "crashtest.py")


def test_crash_harness_kills_and_power_cuts_leave_no_torn_file(tmp_path):
    res = subprocess.run([sys.executable, HARNESS, "--trials", "4", "--seed", "7", "--json",
                          "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=240)
    summary = json.loads(res.stdout)
    assert res.returncode == 0 and summary["failed"] is None, (summary, res.stderr[-3000:])
    assert summary["trials"] == 4 and summary["kill"] >= 1 and summary["powercut"] >= 1, summary
    assert summary["promises_checked"] > 0 and summary["files_checked"] > 0, summary
    assert summary["recoveries"] == 4, summary  # every trial's mount recovered from a crash


def test_crash_harness_with_direct_writers(tmp_path):
    """Clients of the direct path storing batches over its socket while the daemon is killed
    (--direct-writers): every batch is there whole after recovery or not at all."""
    res = subprocess.run([sys.executable, HARNESS, "--trials", "3", "--seed", "11", "--direct-writers", "2",
                          "--max-run", "1.5", "--json", "--workdir", str(tmp_path)],
                         capture_output=True, text=True, timeout=240)
    summary = json.loads(res.stdout)
    assert res.returncode == 0 and summary["failed"] is None, (summary, res.stderr[-3000:])
    assert summary["trials"] == 3 and summary["kill"] >= 1 and summary["powercut"] >= 1, summary
    assert summary["direct_writers"] == 2 and summary["direct_batches"] > 0, summary
    assert summary["recoveries"] == 3, summary


def test_crash_harness_catches_drives_that_lie_about_syncs(tmp_path):
    """The harness can fail: with drives that acknowledge syncs they do not do, a power cut
    loses data that fsync promised, and the harness must say so."""
    res = subprocess.run([sys.executable, HARNESS, "--trials", "2", "--seed", "3", "--power-cut-share", "1",
                          "--lying-sync", "--json", "--workdir", str(tmp_path)], capture_output=True,
                         text=True, timeout=240)
    summary = json.loads(res.stdout)
    assert res.returncode == 1 and summary["failed"], summary
    assert any("Input/output error" in p or "is gone" in p for p in summary["failed"]["problems"]), summary


def test_a_reader_closing_a_file_being_written_publishes_nothing_of_it(make_mount):
    """Only the writer's own flush, fsync or close publishes what it wrote. A reader that
    opens and closes the file meanwhile (a directory scanner, an LMCache lookup) does not:
    a kill -9 then leaves the file as it was before the writer began (here, never
    published: gone), not the writer's first half. A file its writer closed stays."""
    m = make_mount()
    with open(m.p("done"), "wb") as f:
        f.write(b"whole")
    first = os.urandom(1 << 20)
    fd = os.open(m.p("f.tmp"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    os.write(fd, first)  # the first of the writer's writes
    with open(m.p("f.tmp"), "rb") as f:  # a reader comes and goes meanwhile
        assert f.read() == first
    with open(m.p("done"), "rb") as f:
        f.read()
    time.sleep(1)  # (a release reaches the daemon after close returned)
    m.kill9()
    try:
        os.close(fd)
    except OSError:  # (the daemon is gone)
        pass
    m.mount()  # recovery
    assert not os.path.exists(m.p("f.tmp"))
    with open(m.p("done"), "rb") as f:
        assert f.read() == b"whole"
    m.umount()
    res = subprocess.run([sys.executable, "-m", "kvfs.tools", "fsck", m.warehouse, "--json"],
                         capture_output=True, text=True)
    assert res.returncode == 0 and json.loads(res.stdout)["clean"], res
