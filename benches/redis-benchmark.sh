#!/usr/bin/env bash
# redis-benchmark against one grapevine member (backup_count 0, through its RESP port) and against
# redis-server, in the same run, with the same flags, unpipelined and with -P 16 (see
# docs/benchmarks.md). Alternates the targets round by round and reports the median round.
#
#   benches/redis-benchmark.sh                   3 rounds, 200000 requests per test
#   benches/redis-benchmark.sh --smoke           1 round, 20000 requests
#   benches/redis-benchmark.sh --rounds 5 --requests 500000
#
# Flags of every redis-benchmark run: -t set,get -c 50 -r 100000 -d 100 -n REQUESTS [-P 16].
# Installs redis-server and redis-tools (Debian packages) if missing; builds grapevine in release
# mode; starts and stops its own servers on free loopback ports.
set -euo pipefail
cd "$(dirname "$0")/.."

rounds=3
requests=200000
while [[ $# -gt 0 ]]; do
    case "$1" in
        --smoke) rounds=1; requests=20000; shift ;;
        --rounds) rounds="$2"; shift 2 ;;
        --requests) requests="$2"; shift 2 ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) echo "redis-benchmark.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

if ! command -v redis-benchmark >/dev/null 2>&1 || ! command -v redis-server >/dev/null 2>&1; then
    echo "redis-benchmark.sh: installing redis-server and redis-tools" >&2
    if [[ $(id -u) -eq 0 ]]; then sudo=(); else sudo=(sudo); fi
    "${sudo[@]}" apt-get install -y redis-server redis-tools >/dev/null \
        || { "${sudo[@]}" apt-get update >/dev/null && "${sudo[@]}" apt-get install -y redis-server redis-tools >/dev/null; }
fi

cargo build --release -p grapevine-bin
bin="${CARGO_TARGET_DIR:-target}/release/grapevine"
work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

wait_ready() { # port, what
    for _ in $(seq 1 300); do
        if [[ "$(redis-cli -p "$1" ping 2>/dev/null)" == PONG ]]; then
            if [[ "$2" == redis ]] || redis-cli -p "$1" info local 2>/dev/null | grep -q '^healthy:true'; then
                return 0
            fi
        fi
        sleep 0.1
    done
    echo "redis-benchmark.sh: $2 on port $1 did not become ready" >&2
    exit 1
}

gv_port=$(free_port)
rs_port=$(free_port)
GRAPEVINE_PORT_AUTO_INCREMENT=false GRAPEVINE_ADMIN_ENABLED=false GRAPEVINE_MAPS__DEFAULT__BACKUP_COUNT=0 \
    "$bin" start --cluster-name "rb-$$" --bind 127.0.0.1 --port "$(free_port)" --resp-port "$gv_port" \
    2>"$work/grapevine.log" &
pids+=($!)
redis-server --bind 127.0.0.1 --port "$rs_port" --save "" --appendonly no --logfile "" >/dev/null &
pids+=($!)
wait_ready "$gv_port" grapevine
wait_ready "$rs_port" redis
echo "grapevine (1 member, backup_count 0) on port $gv_port, $(redis-server --version | cut -d' ' -f1-3) on port $rs_port" >&2

results="$work/results.tsv"
for round in $(seq 1 "$rounds"); do
    for pipeline in 1 16; do
        for target in grapevine redis; do
            port=$gv_port
            [[ $target == redis ]] && port=$rs_port
            echo "round $round/$rounds: $target, -P $pipeline" >&2
            redis-benchmark -h 127.0.0.1 -p "$port" -t set,get -c 50 -r 100000 -d 100 -n "$requests" -P "$pipeline" \
                2>/dev/null | tr '\r' '\n' >"$work/out"
            python3 - "$work/out" "$round" "$pipeline" "$target" >>"$results" <<'PY'
import re, sys
path, round_, pipeline, target = sys.argv[1:]
test, rps, p999, summary = None, {}, {}, {}
lines = open(path).read().splitlines()
for i, line in enumerate(lines):
    m = re.match(r"====== (\S+) ======", line.strip())
    if m:
        test = m.group(1)
        continue
    m = re.match(r"\s*([\d.]+)% <= ([\d.]+) milliseconds", line)
    if m and test and float(m.group(1)) >= 99.9 and test not in p999:
        p999[test] = float(m.group(2))
    m = re.search(r"throughput summary: ([\d.]+) requests per second", line)
    if m and test:
        rps[test] = float(m.group(1))
    if test and line.split() == ["avg", "min", "p50", "p95", "p99", "max"]:
        values = [float(v) for v in lines[i + 1].split()]
        summary[test] = (values[2], values[4])
for t in rps:
    p50, p99 = summary[t]
    print(f"{round_}\t{pipeline}\t{target}\t{t}\t{rps[t]:.0f}\t{p50}\t{p99}\t{p999.get(t, float('nan'))}")
PY
        done
    done
done

python3 - "$results" "$rounds" "$requests" <<'PY'
import sys
from collections import defaultdict
path, rounds, requests = sys.argv[1], sys.argv[2], sys.argv[3]
runs = defaultdict(list)
for line in open(path):
    r, p, target, test, rps, p50, p99, p999 = line.split("\t")
    runs[(int(p), test, target)].append((float(rps), float(p50), float(p99), float(p999)))
def median(key):
    rs = sorted(runs[key])
    return rs[len(rs) // 2]
print(f"redis-benchmark -t set,get -c 50 -r 100000 -d 100 -n {requests} [-P 16]; median of {rounds} round(s)")
print(f"{'test':<10} {'target':<10} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'p99.9 ms':>9} | "
      f"{'ops ratio':>9} {'p50 ratio':>9} {'p99 ratio':>9} {'p99.9 r.':>9}")
for p in (1, 16):
    for test in ("SET", "GET"):
        g, r = median((p, test, "grapevine")), median((p, test, "redis"))
        name = f"{test} -P {p}" if p > 1 else test
        for target, m in (("grapevine", g), ("redis", r)):
            ratios = "" if target == "redis" else " ".join(f"{a / b:>8.2f}x" for a, b in zip(g, r))
            print(f"{name:<10} {target:<10} {m[0]:>10.0f} {m[1]:>8.3f} {m[2]:>8.3f} {m[3]:>9.3f} | {ratios}")
print("every round (req/s):")
for key in sorted(runs):
    print(f"  -P {key[0]:<2} {key[1]:<4} {key[2]:<10} " + " ".join(f"{x[0]:.0f}" for x in runs[key]))
PY
