#!/usr/bin/env bash
# The test command: installs what is missing, builds the guest kernel (cached),
# checks formatting and lints, then runs every test. VM tests boot real
# guests whenever /dev/kvm exists; without it they are skipped LOUDLY.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build-kernel.sh
bash scripts/build-passt.sh
bash scripts/build-agent.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
if [ -r /dev/kvm ] && [ -w /dev/kvm ]; then
  # A VM test that cannot open /dev/kvm now fails instead of skipping.
  export MICROAGENT_REQUIRE_KVM=1
  echo "test: /dev/kvm present: VM tests boot real guests$( [ -d /sys/module/kvm_pvm ] && echo ' (PVM host: expect ~1-2 min per boot)')"
else
  cat >&2 <<'MSG'
########################################################################
#  WARNING: /dev/kvm is NOT available on this machine.                 #
#  VM tests will be SKIPPED: no guest is booted, nothing VM-related    #
#  is verified by this run.                                            #
########################################################################
MSG
fi
if [ "$#" -gt 0 ]; then
  exec cargo test --workspace --no-fail-fast "$@"
fi
# Two lanes of test binaries at once: a VM test spends most of its time
# waiting on its guests, so two binaries side by side take little more
# than the longer one (measured: checkpoint and home_snapshots, 119 s and
# 139 s alone, 152 s together). Lane B's binaries are listed; lane A runs
# every other one and the unit tests (both with --workspace: the same
# feature set as the build, so nothing is built twice). Lane B's output
# is printed after lane A's.
cargo test --workspace --no-run
lane_b="network volumes warm_start exec home_snapshots hostile_guest"
lane_a=()
for f in tests/*.rs; do
  t=$(basename "$f" .rs)
  [[ " $lane_b " == *" $t "* ]] || lane_a+=(--test "$t")
done
lane_b_args=()
for t in $lane_b; do lane_b_args+=(--test "$t"); done
lane_b_log=target/test-lane-b.log
cargo test --workspace --no-fail-fast "${lane_b_args[@]}" >"$lane_b_log" 2>&1 &
lane_b_pid=$!
status=0
cargo test --workspace --no-fail-fast --lib --bins "${lane_a[@]}" || status=$?
lane_b_status=0
wait "$lane_b_pid" || lane_b_status=$?
echo "=== test lane B: ${lane_b} (exit ${lane_b_status}) ==="
cat "$lane_b_log"
[ "$lane_b_status" -eq 0 ] || status=$lane_b_status
exit "$status"
