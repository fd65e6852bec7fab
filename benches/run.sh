#!/usr/bin/env bash
# Runs the grapevine-vs-redis load generator (see docs/benchmarks.md).
#
#   benches/run.sh                 defaults: 32 clients, 10 s measured (+2 s warm-up) per target,
#                                  100k keys, 100-byte values, 80% gets, 3 members, backup_count 1
#   benches/run.sh --smoke         quick check: 3 s measured, 10k keys
#   benches/run.sh [--smoke] -- ARGS   extra loadgen arguments (see `loadgen --help`)
#
# Installs redis-server (Debian package) if missing, builds in release mode and runs `loadgen`,
# which starts and stops the redis-server processes itself.
set -euo pipefail

cd "$(dirname "$0")/.."

smoke=()
extra=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --smoke) smoke=(--duration-secs 3 --keys 10000); shift ;;
        --) shift; extra=("$@"); break ;;
        -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
        *) extra+=("$1"); shift ;;
    esac
done

if ! command -v redis-server >/dev/null 2>&1; then
    echo "run.sh: installing redis-server" >&2
    if [[ $(id -u) -eq 0 ]]; then sudo=(); else sudo=(sudo); fi
    "${sudo[@]}" apt-get install -y redis-server >/dev/null \
        || { "${sudo[@]}" apt-get update >/dev/null && "${sudo[@]}" apt-get install -y redis-server >/dev/null; }
fi
# The Debian package starts a system redis on 6379; loadgen uses its own servers on free ports.

cargo build --release -p grapevine-benches --bin loadgen
target_dir="${CARGO_TARGET_DIR:-target}"
exec "$target_dir/release/loadgen" "${smoke[@]}" "${extra[@]}"
