#!/usr/bin/env bash
# Run the tests (sets everything up first). Arguments go to pytest: paths and node ids select
# tests as with pytest (bash scripts/test.sh tests/test_soak.py, ...::test_soak_script_briefly,
# taken from the directory this is run in); options alone run the whole suite with them
# (bash scripts/test.sh -x -k soak).
set -euo pipefail
caller=$PWD
cd "$(dirname "$0")/.."
args=()
where=(tests)  # unless a path or node id is given
for a in "$@"; do
    # A path or node id: not an option, and what comes before any "::" exists. (An option's
    # value, like soak in -k soak, names no file; nor does a mistyped path, which pytest is
    # then left to report.)
    if [[ $a != -* ]]; then
        if [[ $a != /* && $caller != "$PWD" && -e $caller/${a%%::*} ]]; then
            a=$caller/$a
        fi
        [[ -e ${a%%::*} ]] && where=()
    fi
    args+=("$a")
done
bash scripts/setup.sh
exec .venv/bin/python -m pytest "${where[@]}" "${args[@]}"
