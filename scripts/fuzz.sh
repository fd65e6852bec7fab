#!/usr/bin/env bash
# A long fuzz run: the fuzz property tests of every crate (frames, handshake, message bodies, gossip
# keys, admin requests; see "Hardened input" in docs/architecture.md) with many more cases than the
# normal test suite runs.
#
#   scripts/fuzz.sh [CASES] [SEED]
#
# CASES: cases per property (default 200000; the normal suite runs 300 to 2000).
# SEED:  proptest's random seed (default: a new one, printed); the same CASES and SEED replay a run.
#
# Built optimised but with overflow checks and debug assertions, so that arithmetic overflow in a
# decoder still fails the run. On a failure proptest prints the minimal failing input and saves it
# under crates/<crate>/proptest-regressions/; every later run (the normal suite included) replays
# saved cases first, so commit that file with the fix.
set -euo pipefail
cd "$(dirname "$0")/.."

cases="${1:-200000}"
seed="${2:-$(od -An -N8 -tu8 /dev/urandom | tr -d ' ')}"
if ! [[ "$cases" =~ ^[0-9]+$ && "$seed" =~ ^[0-9]+$ ]]; then
  echo "usage: $0 [CASES] [SEED]   (both whole numbers)" >&2
  exit 2
fi

export GRAPEVINE_FUZZ_CASES="$cases" PROPTEST_RNG_SEED="$seed"
export CARGO_PROFILE_RELEASE_OVERFLOW_CHECKS=true CARGO_PROFILE_RELEASE_DEBUG_ASSERTIONS=true

# package : what its fuzz_tests module covers
targets=(
  "grapevine-net:frames, handshake, codec"
  "grapevine-membership:gossip key parsers"
  "grapevine-map:Msg and Reply bodies, gossip table ids"
  "grapevine:admin router (paths, queries, bodies)"
)

echo "fuzzing with GRAPEVINE_FUZZ_CASES=$cases PROPTEST_RNG_SEED=$seed"
failed=()
for target in "${targets[@]}"; do
  package="${target%%:*}"
  echo "== $package (${target#*:})"
  start=$SECONDS
  if cargo test --release --locked -p "$package" --lib fuzz_tests -- --test-threads=2; then
    echo "== $package: passed in $((SECONDS - start)) s"
  else
    failed+=("$package")
  fi
done

if ((${#failed[@]})); then
  echo
  echo "FAILED: ${failed[*]}"
  echo "The minimal failing input of each failed property is printed above, and saved under"
  echo "crates/<crate>/proptest-regressions/ (replayed first by every later run)."
  echo "Reproduce this run exactly:"
  echo "  scripts/fuzz.sh $cases $seed"
  echo "or one property, e.g.:"
  echo "  GRAPEVINE_FUZZ_CASES=$cases PROPTEST_RNG_SEED=$seed cargo test --release -p ${failed[0]} --lib fuzz_tests::<property>"
  exit 1
fi
echo "all fuzz properties passed ($cases cases each, seed $seed)"
