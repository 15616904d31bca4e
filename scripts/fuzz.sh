#!/usr/bin/env bash
# Coverage-guided fuzzing of microagent's parsers of untrusted input with
# AFL++ through cargo-afl, on the stable toolchain (src/fuzzing.rs lists
# the targets; fuzz/corpus/<target> holds their seeds).
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]   default: 60 s each, every target
#
# Installs cargo-afl and builds its AFL++ on first use, runs the targets
# two at a time (one per core), then prints one JSON line per target
# (executions, paths, crashes, hangs) and a total. Exit 1 if any target
# found a crash: its inputs are under target/fuzz/<target>/default/crashes;
# replay one with `fuzz/target/release/microagent-fuzz TARGET < FILE`.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
shift || true
if ! cargo afl --version >/dev/null 2>&1; then
  cargo install cargo-afl --locked
fi
# cargo-afl's AFL++ (afl-fuzz and its runtime), built once per rustc.
if ! out=$(cargo afl config --build 2>&1) && ! grep -q "already built" <<<"$out"; then
  echo "$out" >&2
  exit 1
fi
(cd fuzz && cargo afl build --release --quiet)
bin=$PWD/fuzz/target/release/microagent-fuzz
if [ $# -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(ls fuzz/corpus)
fi
export AFL_SKIP_CPUFREQ=1 AFL_NO_UI=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1
# The whole crate is instrumented: a coverage map larger than AFL's default.
AFL_MAP_SIZE=$(AFL_DUMP_MAP_SIZE=1 "$bin" control || true)
export AFL_MAP_SIZE
run() {
  local t=$1 out=target/fuzz/$1
  mkdir -p "$out"
  # -V: stop after SECONDS; an existing output dir resumes ("-i -").
  local input=(-i "fuzz/corpus/$t")
  [ -f "$out/default/fuzzer_stats" ] && input=(-i -)
  # -t: generous per-input time (devices and tars make directories), and
  # inputs over it are skipped rather than fatal.
  cargo afl fuzz -V "$secs" -t 2000+ "${input[@]}" -o "$out" -- "$bin" "$t" \
    > "$out.log" 2>&1 || { echo "fuzz: $t: afl-fuzz failed, see $out.log" >&2; return 1; }
}
pids=()
for t in "${targets[@]}"; do
  run "$t" &
  pids+=($!)
  if [ ${#pids[@]} -ge 2 ]; then
    wait "${pids[0]}"
    pids=("${pids[@]:1}")
  fi
done
for p in "${pids[@]}"; do wait "$p"; done
total=0
crashed=0
for t in "${targets[@]}"; do
  stats=target/fuzz/$t/default/fuzzer_stats
  val() { awk -F' *: *' -v k="$1" '$1 == k {print $2}' "$stats"; }
  execs=$(val execs_done) paths=$(val corpus_count) crashes=$(val saved_crashes) hangs=$(val saved_hangs)
  total=$((total + execs))
  [ "${crashes:-0}" -gt 0 ] && crashed=1
  echo "{\"target\":\"$t\",\"seconds\":$secs,\"execs\":$execs,\"paths\":$paths,\"crashes\":${crashes:-0},\"hangs\":${hangs:-0}}"
done
echo "{\"targets\":${#targets[@]},\"total_execs\":$total}"
exit $crashed
