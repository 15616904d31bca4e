#!/usr/bin/env bash
# CI with checkpoints: pay for boot and setup once, then run the test jobs
# as parallel forks of the set-up guest.
#
#   scripts/examples/ci-checkpoint.sh [IMAGE]
#
# The first run is a cache miss: it boots a workspace, runs the setup and
# snapshots it. Every later run with the same inputs (image, kernel, setup
# command, deps.lock's content) is a hit and only forks. Change deps.lock
# and the next run builds a new checkpoint (the older ones beyond --keep
# are deleted). Uses $MICROAGENT (default: microagent on PATH).
set -euo pipefail
mk=${MICROAGENT:-microagent}
image=${1:-localhost/busybox:latest}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
# The setup's input: its content is part of the checkpoint's key.
printf 'dep-a 1.0\ndep-b 2.3\n' > deps.lock
# The setup we pay for once ("installing" the locked dependencies).
setup='mkdir -p /opt/deps && while read -r name ver; do echo "$ver" > "/opt/deps/$name"; done < deps.lock && echo "installed $(ls /opt/deps | wc -l) dependencies"'
checkpoint() {
  "$mk" checkpoint ci --image "$image" --memory 256 --file deps.lock --keep 2 "$@" -- sh -c "$setup"
}

echo "== setup: a miss on the first run, a hit afterwards"
checkpoint

echo "== three test jobs, each in its own fork, in parallel"
job() {
  local i=$1
  checkpoint --fork "ci-job-$i" --quiet
  # The job's own test: job 3 checks a dependency the others don't.
  "$mk" exec "ci-job-$i" -- sh -c "test \"\$(cat /opt/deps/dep-b)\" = 2.3 && test $i != 3 -o -f /opt/deps/dep-a"
}
pids=()
for i in 1 2 3; do
  job "$i" > "job-$i.log" 2>&1 &
  pids+=($!)
done
failed=0
for i in 1 2 3; do
  rc=0
  wait "${pids[$((i - 1))]}" || rc=$?
  echo "job $i: exit $rc"
  [ "$rc" -eq 0 ] || { failed=1; sed 's/^/    /' "job-$i.log"; }
done

echo "== cleanup: the jobs' forks go, the checkpoint stays for the next run"
for i in 1 2 3; do
  "$mk" delete "ci-job-$i" --yes --force --quiet 2>/dev/null || true
done
exit "$failed"
