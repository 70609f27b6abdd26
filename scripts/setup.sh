#!/usr/bin/env bash
# Idempotent, non-interactive set-up: Debian packages (fuse3, libfuse3-dev, pkg-config, fio),
# a virtualenv in .venv, kvfs with its test dependencies and the inference clients the tests
# drive (KVFS_SKIP_CLIENTS=1 skips those: the quickstart does). Safe to run again and again:
# each step it does prints one line (what, then how long it took); nothing to do, nothing
# printed. pip's own output goes to .venv/pip.log.
set -euo pipefail
cd "$(dirname "$0")/.."

# step LOG WHAT COMMAND...: run COMMAND (stdin closed, output appended to LOG) as one line:
# "setup: WHAT... done in N s". On failure, the end of LOG and where it is; setup stops.
step() {
    local log=$1 what=$2 t0=$SECONDS
    shift 2
    printf 'setup: %s... ' "$what"
    if "$@" </dev/null >>"$log" 2>&1; then
        echo "done in $((SECONDS - t0)) s"
    else
        echo "failed"
        tail -n 30 "$log" >&2
        echo "setup: $what failed (full log: $log)" >&2
        exit 1
    fi
}

apt_install() {
    DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}

venv_pip() {
    .venv/bin/python -m pip --disable-pip-version-check "$@"
}

install_kvfs() {
    venv_pip install -q --upgrade pip && venv_pip install -q -e ".[test]"
}

# torch is asked for on its own, pinned, first: that takes the CPU build this machine keeps
# on disk, where lmcache's bare "torch" requirement would otherwise pull a CUDA build of
# several GB.
CLIENTS=("torch==2.13.0" "lmcache==0.5.6")
install_clients() {
    local spec
    for spec in "${CLIENTS[@]}"; do
        venv_pip install -q "$spec" || return
    done
}

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
    # Before .venv exists: the log goes to a temporary file, kept only if apt fails.
    log=$(mktemp -t kvfs-setup-apt.XXXXXX.log)
    step "$log" "installing ${need[*]} with apt-get (about a minute)" apt_install "${need[@]}"
    rm -f "$log"
fi
if [ ! -e /dev/fuse ]; then
    echo "setup: /dev/fuse is missing: this machine cannot mount FUSE filesystems" >&2
fi

# A .venv whose python cannot run or has no pip is a half-made one (venv fails after making
# bin/python when ensurepip is missing, as without Debian's python3-venv): made again.
# make_venv removes what a failed attempt left, so that the next run starts afresh too.
PY=${PYTHON:-python3}
make_venv() {
    "$PY" -m venv .venv || { rm -rf .venv; return 1; }
}
if [ -e .venv ] && ! .venv/bin/python -c "import pip" >/dev/null 2>&1; then
    echo "setup: .venv is incomplete (no python or no pip in it): making it again"
    rm -rf .venv
fi
if [ ! -e .venv ]; then
    log=$(mktemp -t kvfs-setup-venv.XXXXXX.log)
    step "$log" "creating .venv (about 10 s)" make_venv
    rm -f "$log"
fi

# Each install is done again when what it was asked for changed (its stamp) or what it
# installed is missing.
stamp=.venv/.kvfs-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! .venv/bin/python -c "import kvfs, pyfuse3" 2>/dev/null; then
    : >.venv/pip.log
    step .venv/pip.log "installing kvfs and its dependencies into .venv (about 30 s)" install_kvfs
    echo "$want" >"$stamp"
fi

# Real inference clients for the tests (LMCache on the CPU). Found, not imported: importing
# torch takes seconds, on every run of the tests.
clients_stamp=.venv/.clients-installed
if [ "${KVFS_SKIP_CLIENTS:-}" != 1 ] &&
   { [ "$(cat "$clients_stamp" 2>/dev/null)" != "${CLIENTS[*]}" ] ||
     ! .venv/bin/python -c 'import importlib.util as u; assert u.find_spec("torch") and u.find_spec("lmcache")' 2>/dev/null; }; then
    step .venv/pip.log "installing the inference clients the tests use: torch (CPU), LMCache (a few minutes)" \
        install_clients
    echo "${CLIENTS[*]}" >"$clients_stamp"
fi
