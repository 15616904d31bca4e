#!/usr/bin/env bash
# Runs every benchmark (boot, exec, snapshot, disk, network, warm starts) and
# prints one table: microagent and QEMU microvm side by side where both are
# measured, on the same kernel, disk and hidden CPU features, with the
# ratio, and which kind of KVM the figures come from.
#
#   scripts/bench.sh [--quick] [OUT.jsonl]
#
# --quick: one run per figure and 256 MiB guests only (about 25 minutes on
# a PVM host instead of about an hour). The JSON lines go to OUT.jsonl
# (default target/bench/results-<UTC time>.jsonl). Needs a quiet host: run
# nothing else that boots guests meanwhile.
set -euo pipefail
cd "$(dirname "$0")/.."
quick=0
if [ "${1:-}" = "--quick" ]; then quick=1; shift; fi
out=${1:-target/bench/results-$(date -u +%Y%m%dT%H%M%SZ).jsonl}
mkdir -p "$(dirname "$out")"
: > "$out"

if [ ! -e /dev/kvm ]; then
  echo "bench: /dev/kvm is not available: nothing can be measured" >&2
  exit 1
fi
# QEMU is the side-by-side reference.
bash scripts/setup.sh --with-qemu
bash scripts/build-kernel.sh >/dev/null
bash scripts/build-passt.sh >/dev/null
bash scripts/build-agent.sh >/dev/null
if [ "$quick" -eq 1 ]; then
  export MICROAGENT_BENCH_RUNS=1 MICROAGENT_BENCH_SNAPSHOT_MIB=256 MICROAGENT_BENCH_DISK_BIG_MIB=2048
fi
for bench in boot exec snapshot disk commit api share network warm_start; do
  echo "bench: $bench ..." >&2
  start=$(date +%s)
  # Each bench prints JSON lines on stdout; keep going if one fails.
  if ! cargo bench --quiet --bench "$bench" 2> "target/bench/$bench.stderr" | tee -a "$out" >&2; then
    echo "{\"bench\":\"$bench\",\"vmm\":\"microagent\",\"error\":\"bench failed, see target/bench/$bench.stderr\"}" >> "$out"
  fi
  echo "bench: $bench took $(( $(date +%s) - start )) s" >&2
done
echo
cargo run --quiet --release --example bench_table -- "$out"
