#!/usr/bin/env bash
# SGLang's HiCache file backend (HiCacheFile), unchanged, on a kvfs mount: one process
# writes pages, another (after a remount) finds and reads them, every byte checked; then
# fsck --verify-data. Not part of the default test command: it installs SGLang without its
# dependencies, plus the modules its storage layer imports, into .venv-sglang (about 2 GB,
# a few minutes the first time). Run it before a release: bash scripts/integration-sglang.sh
set -euo pipefail
cd "$(dirname "$0")/.."
KVFS_SKIP_CLIENTS=1 bash scripts/setup.sh
V=.venv-sglang
PAGES=${PAGES:-256}
if ! "$V/bin/python" -c "from sglang.srt.mem_cache.hicache_storage import HiCacheFile" 2>/dev/null; then
    echo "integration: installing SGLang (no dependencies) and what its storage layer imports into $V"
    python3 -m venv "$V"
    {
        "$V/bin/pip" install -q "torch==2.13.0" &&   # the CPU build on disk
        "$V/bin/pip" install -q --no-deps "sglang==0.5.23" &&
        "$V/bin/pip" install -q "numpy==2.4.6" "orjson==3.13.0" "psutil==7.2.2" "pybase64==1.5.1" \
            "requests==2.34.2" "triton==3.9.0" "packaging==26.3" "pillow==13.0.0" "starlette==1.10.0" \
            "msgspec==0.22.0" "pydantic==2.14.3" "pyzmq==27.3.0" "tqdm==4.70.1" "ipython==9.18.1" \
            "aiohttp==3.14.5"
    } </dev/null >"$V.log" 2>&1 || { tail -n 20 "$V.log" >&2; echo "integration: install failed ($V.log)" >&2; exit 1; }
fi
work=$(mktemp -d /tmp/kvfs-sglang.XXXXXX)
cleanup() {
    .venv/bin/kvfs umount "$work/m" >/dev/null 2>&1 || fusermount3 -u -z "$work/m" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
.venv/bin/kvfs mkfs "$work/w" --size 1G >/dev/null
mkdir "$work/m"
.venv/bin/kvfs mount "$work/w" "$work/m"
wrote=$("$V/bin/python" scripts/sglang_roundtrip.py write "$work/m/hicache" "$PAGES" | tail -n 1)
.venv/bin/kvfs umount "$work/m"
.venv/bin/kvfs mount "$work/w" "$work/m"
read=$("$V/bin/python" scripts/sglang_roundtrip.py read "$work/m/hicache" "$PAGES" | tail -n 1)
.venv/bin/kvfs umount "$work/m"
.venv/bin/kvfs fsck "$work/w" --verify-data
echo "integration: SGLang HiCacheFile wrote $wrote, read back $read"
expect="{\"present\": $PAGES, \"equal\": $PAGES, \"missing\": false}"
if [ "$wrote" != "{\"written\": $PAGES}" ] || [ "$read" != "$expect" ]; then
    echo "integration: FAILED" >&2
    exit 1
fi
echo "integration: PASSED"
