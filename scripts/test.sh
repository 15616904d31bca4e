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
cargo test --workspace --no-fail-fast "$@"
