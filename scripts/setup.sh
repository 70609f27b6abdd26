#!/usr/bin/env bash
# Idempotent, non-interactive set-up: Debian packages (fuse3, libfuse3-dev, pkg-config, fio),
# a virtualenv in .venv, kvfs with its test dependencies and the inference clients the tests
# drive (KVFS_SKIP_CLIENTS=1 skips those: the quickstart does). Safe to run again and again.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v fusermount3 >/dev/null 2>&1 || need+=(fuse3)
dpkg -s libfuse3-dev >/dev/null 2>&1 || need+=(libfuse3-dev)
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
command -v fio >/dev/null 2>&1 || need+=(fio)
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "setup: missing Debian packages: ${need[*]} (run as root, or install them)" >&2
        exit 1
    fi
    echo "setup: installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq </dev/null
    apt-get install -y -qq --no-install-recommends "${need[@]}" </dev/null >/dev/null
fi
if [ ! -e /dev/fuse ]; then
    echo "setup: /dev/fuse is missing: this machine cannot mount FUSE filesystems" >&2
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    "$PY" -m venv .venv
fi
stamp=.venv/.kvfs-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! .venv/bin/python -c "import kvfs, pyfuse3" 2>/dev/null; then
    echo "setup: installing kvfs and its dependencies into .venv"
    if ! { .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip &&
           .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"; } \
           </dev/null >.venv/pip.log 2>&1; then
        tail -n 30 .venv/pip.log >&2
        echo "setup: pip install failed (full log: .venv/pip.log)" >&2
        exit 1
    fi
    echo "$want" > "$stamp"
fi

# Real inference clients for the tests (LMCache on the CPU). torch is asked for on its own,
# pinned, first: that takes the CPU build this machine keeps on disk, where lmcache's bare
# "torch" requirement would otherwise pull a CUDA build of several GB.
if [ "${KVFS_SKIP_CLIENTS:-}" != 1 ] && ! .venv/bin/python -c "import torch, lmcache" 2>/dev/null; then
    echo "setup: installing the inference clients the tests use (torch CPU, LMCache)"
    if ! { .venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0" &&
           .venv/bin/python -m pip install -q --disable-pip-version-check "lmcache==0.5.6"; } \
           </dev/null >>.venv/pip.log 2>&1; then
        tail -n 30 .venv/pip.log >&2
        echo "setup: installing the clients failed (full log: .venv/pip.log)" >&2
        exit 1
    fi
fi
