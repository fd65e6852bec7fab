#!/usr/bin/env bash
# Runs the seeded fault harness (tests/tests/faults.rs) over many seeds: thousands by default.
#
#   scripts/faults.sh [SEEDS] [FIRST_SEED] [PARALLEL]
#
# Each seed draws a schedule of single faults against a 3- or 5-member in-process cluster under
# concurrent writers and checks the whole history. A failing schedule is printed with its seed;
# replay one with:  GRAPEVINE_HARNESS_SEED=<seed> cargo test -p grapevine-tests --test faults -- --nocapture
# Logs: RUST_LOG=info,grapevine_map=debug scripts/faults.sh 200  (large: send them to a file).
set -euo pipefail
cd "$(dirname "$0")/.."
seeds=${1:-2000}
first=${2:-1}
parallel=${3:-4}
echo "fault harness: $seeds seeds from $first, $parallel at a time"
GRAPEVINE_HARNESS_SEEDS=$seeds GRAPEVINE_HARNESS_FIRST_SEED=$first GRAPEVINE_HARNESS_PARALLEL=$parallel \
  cargo test --release -p grapevine-tests --test faults -- --nocapture
