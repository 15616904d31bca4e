#!/usr/bin/env bash
# The main job, for a newcomer on a fresh machine: installs what is missing,
# builds the guest kernel (cached), builds microagent, builds the default image
# (busybox-static as an OCI layout), then create -> start -> exec -> snapshot
# -> fork -> push and fork on a second host -> roll back -> commit -> the
# HTTP API, with timings.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
cache=${MICROAGENT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/microagent}
step() { printf '\n==> %s\n' "$*"; }
t0=$(date +%s)

step "installing packages (if missing)"
bash scripts/setup.sh
step "building the guest kernel (cached after the first run, ~7 min on 2 cores)"
kernel_dir=$(bash scripts/build-kernel.sh | sed -n 's/^kernel: //p')
step "building passt, the per-VM user-mode network (cached; Debian 12's own resets silent uploads)"
bash scripts/build-passt.sh >/dev/null
step "building microagent and its static guest agent"
cargo build --release --quiet
bash scripts/build-agent.sh >/dev/null
bin=$repo/target/release/microagent

step "building the default image: an OCI layout of Debian's busybox-static (cached)"
layout=$(bash scripts/image-busybox.sh)

# A private state directory, so the demo never touches real workspaces.
export MICROAGENT_HOME=$cache/demo/home
export MICROAGENT_KERNEL=$kernel_dir/vmlinux
for ws in demo demo-fork; do "$bin" delete "$ws" --yes --force >/dev/null 2>&1 || true; done
"$bin" image rm localhost/busybox:setup >/dev/null 2>&1 || true
"$bin" snapshot delete demo-home --yes >/dev/null 2>&1 || true

timed() { local s; s=$(date +%s%N); "$@"; echo "    ($(( ($(date +%s%N) - s) / 1000000 )) ms)"; }
step "image import: verify blobs, build one shared read-only layer disk per layer"
timed "$bin" image import "$layout" --tag localhost/busybox:latest
"$bin" image ls
step "create: an empty copy-on-write upper over the image's shared layer disks"
timed "$bin" create demo --image localhost/busybox:latest --vcpus 2 --memory 512
step "start: a detached VMM; returns once the guest agent answers (about a minute on PVM hosts)"
timed "$bin" start demo
"$bin" list
step "exec: the setup we pay for once"
timed "$bin" exec demo -- sh -c 'echo "hello from $(hostname): $(uname -sr), $(grep -c ^processor /proc/cpuinfo) vCPUs"; echo "dependencies installed" > /root/setup.txt'
step "its root: the image's shared read-only layer disks under the workspace's own upper"
"$bin" exec demo -- sh -c 'grep " / " /proc/mounts'
step "cp out"
rm -rf "$cache/demo/out" && mkdir -p "$cache/demo/out"
timed "$bin" cp demo:/root/setup.txt "$cache/demo/out"
echo "    host copy says: $(cat "$cache/demo/out/setup.txt")"
step "snapshot: memory, vCPU and device state, and the disk"
timed "$bin" snapshot create demo --tag ready
"$bin" snapshot list demo
timed "$bin" snapshot verify demo ready
step "fork: a new workspace resumed from the snapshot (no boot)"
timed "$bin" create demo-fork --from-snapshot demo:ready
timed "$bin" exec demo-fork -- sh -c 'echo "$(hostname) sees: $(cat /root/setup.txt)"'
step "share: push the snapshot to a registry, fork it on a second host (a second state directory)"
timed "$bin" halt demo-fork
reg_dir=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
printf 'version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: %s\nhttp:\n  addr: 127.0.0.1:%s\n' \
  "$reg_dir/data" "$port" > "$reg_dir/config.yml"
docker-registry serve "$reg_dir/config.yml" >/dev/null 2>&1 &
reg_pid=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/v2/" >/dev/null && break; sleep 0.1; done
timed "$bin" snapshot push demo:ready "127.0.0.1:$port/demo/ready:v1" --quiet
second=$cache/demo/second-host
rm -rf "$second"
timed env MICROAGENT_HOME="$second" "$bin" create elsewhere --from-snapshot "127.0.0.1:$port/demo/ready:v1" --quiet
timed env MICROAGENT_HOME="$second" "$bin" exec elsewhere -- sh -c 'echo "$(hostname) sees: $(cat /root/setup.txt)"'
MICROAGENT_HOME="$second" "$bin" delete elsewhere --yes --force >/dev/null
kill "$reg_pid"; wait "$reg_pid" 2>/dev/null || true
rm -rf "$reg_dir" "$second"
step "roll back in place: break the workspace, then start it from the snapshot"
"$bin" exec demo -- rm /root/setup.txt
timed "$bin" halt demo
timed "$bin" start demo --from-snapshot ready
timed "$bin" exec demo -- cat /root/setup.txt
step "diff and commit: the workspace's changes become one more image layer"
"$bin" diff demo
timed "$bin" commit demo localhost/busybox:setup
"$bin" image ls
step "home snapshot: exactly the files listed in ~/.snapshot/includes.txt, as a one-layer image"
"$bin" exec demo -- sh -c 'mkdir -p /root/.snapshot && echo setup.txt > /root/.snapshot/includes.txt'
timed "$bin" snapshot create demo --home demo-home
"$bin" snapshot list
echo "    (create NEW --base-snapshot NAME --home-snapshot demo-home stacks it; apply -f does it from YAML: docs/definitions.md)"
"$bin" snapshot delete demo-home --yes
step "the HTTP API: the same engine over a unix socket (microagent serve)"
sock=$cache/demo/api.sock
"$bin" serve --listen "unix:$sock" 2>/dev/null &
api_pid=$!
for _ in $(seq 200); do curl -sf --unix-socket "$sock" http://demo/v1/openapi.json >/dev/null && break; sleep 0.1; done
echo "    GET /api/vps/snapshots/demo/latest (seed 002's route):"
curl -sf --unix-socket "$sock" http://demo/api/vps/snapshots/demo/latest | sed 's/^/    /'; echo
echo "    POST /v1/workspaces/demo/exec (NDJSON as the output comes):"
curl -sfN --unix-socket "$sock" -X POST http://demo/v1/workspaces/demo/exec \
  -d '{"argv":["sh","-c","echo hello over HTTP from $(hostname); echo to stderr >&2"]}' | sed 's/^/    /'
kill "$api_pid"; wait "$api_pid" 2>/dev/null || true
step "halt and delete"
timed "$bin" delete demo-fork --yes
timed "$bin" halt demo
timed "$bin" delete demo --yes
"$bin" image rm localhost/busybox:setup
step "done in $(( $(date +%s) - t0 )) s"
