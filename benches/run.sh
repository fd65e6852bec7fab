#!/usr/bin/env bash
# Runs the grapevine-vs-redis load generator (see docs/benchmarks.md), once per read/write mix.
#
#   benches/run.sh                 defaults: 32 clients, 10 s measured (+2 s warm-up) per target,
#                                  100k keys, 100-byte values, 80/20 and 50/50 get/put mixes;
#                                  targets: 3 grapevine processes through RESP (backup_count 1),
#                                  3 embedded members (backup_count 1), redis primary + replica
#   benches/run.sh --smoke         quick check: 3 s measured, 10k keys, 80/20 only
#   benches/run.sh --memory        memory per entry instead: 1M keys into one grapevine process
#                                  (backup_count 0) and into redis, RSS and used_memory growth
#   benches/run.sh --migration     migration instead: 1 GiB into 3 processes, add a fourth, MB/s
#                                  and a light load's latencies before and during
#   benches/run.sh [--smoke] -- ARGS   extra loadgen arguments (see `loadgen --help`)
#
# Installs redis-server (Debian package) if missing, builds loadgen and grapevine in release
# mode and runs loadgen, which starts and stops the grapevine and redis-server processes itself.
# benches/redis-benchmark.sh runs redis-benchmark against one member and redis-server.
set -euo pipefail

cd "$(dirname "$0")/.."

smoke=()
extra=()
mixes=(80 50)
memory=false
migration=false
while [[ $# -gt 0 ]]; do
    case "$1" in
        --smoke) smoke=(--duration-secs 3 --keys 10000); mixes=(80); shift ;;
        --memory) memory=true; shift ;;
        --migration) migration=true; shift ;;
        --) shift; extra=("$@"); break ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
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

cargo build --release -p grapevine-benches --bin loadgen --bin migrate -p grapevine-bin
target_dir="${CARGO_TARGET_DIR:-target}"
loadgen="$target_dir/release/loadgen"
if $migration; then
    exec "$target_dir/release/migrate" "${extra[@]}"
fi
if $memory; then
    exec "$loadgen" --target resp-vs-redis --members 1 --backup-count 0 --keys 1000000 \
        --duration-secs 2 --warmup-secs 1 "${extra[@]}"
fi
for mix in "${mixes[@]}"; do
    echo "== ${mix}% gets" >&2
    "$loadgen" --read-percent "$mix" "${smoke[@]}" "${extra[@]}"
done
