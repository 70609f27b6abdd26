"""scripts/soak.py, briefly, so that it keeps working: mixed clients on a small warehouse
at full capacity for a few seconds, then fsck."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_soak_script_briefly(tmp_path):
    res = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "soak.py"), "--minutes", "0.2",
                          "--size", "64M", "--clients", "8", "--sample-seconds", "1", "--dir", str(tmp_path),
                          "--json"], capture_output=True, text=True, timeout=300)
    summary = json.loads(res.stdout)
    assert res.returncode == 0, (summary["failures"], summary.get("error_samples"), res.stderr[-2000:])
    assert summary["result"] == "PASS" and summary["fsck"]["clean"]
    assert summary["ops"]["write"] > 0 and summary["ops"]["read"] > 0, summary["ops"]
    assert summary["evicted_files"] > 0, "the warehouse never filled up"
    assert summary["errors"] == {} and summary["wrong_bytes"] == 0
    assert summary["rss_mib"]["samples"] >= 5

