#!/usr/bin/env bash
# The main job, for a newcomer on a fresh machine: installs what is missing,
# builds the guest kernel (cached), builds microagent, builds a busybox root
# disk and boots it, showing the guest's serial console until it powers off.
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
step "building microagent and its static guest agent"
cargo build --release --quiet
bash scripts/build-agent.sh >/dev/null
bin=$repo/target/release/microagent

step "building a busybox root disk"
mkdir -p "$cache/demo"
cat > "$cache/demo/init" <<'INIT'
#!/bin/sh
echo "demo init started by the guest agent at $(cut -d' ' -f1 /proc/uptime) s of guest uptime"
while true; do sleep 3600; done
INIT
bash scripts/make-busybox-rootfs.sh "$cache/demo/rootfs.ext4" "$cache/demo/init"

# A private state directory, so the demo never touches real workspaces.
export MICROAGENT_HOME=$cache/demo/home
export MICROAGENT_KERNEL=$kernel_dir/vmlinux
"$bin" delete demo --yes --force >/dev/null 2>&1 || true

timed() { local s; s=$(date +%s%N); "$@"; echo "    ($(( ($(date +%s%N) - s) / 1000000 )) ms)"; }
step "create: the workspace gets its own copy of the disk, with the guest agent injected"
timed "$bin" create demo --rootfs "$cache/demo/rootfs.ext4" --vcpus 2 --memory 512 --disk-size 256M --init /init
step "start: a detached VMM; returns once the guest agent answers (about a minute on PVM hosts)"
timed "$bin" start demo
"$bin" list
step "exec"
timed "$bin" exec demo -- sh -c 'echo "hello from $(hostname): $(uname -sr), $(grep -c ^processor /proc/cpuinfo) vCPUs"; echo checkpoint-1 > /root/progress.txt'
timed "$bin" exec demo -- cat /root/progress.txt
step "cp out and back in"
rm -rf "$cache/demo/out" && mkdir -p "$cache/demo/out"
timed "$bin" cp demo:/root/progress.txt "$cache/demo/out"
echo "    host copy says: $(cat "$cache/demo/out/progress.txt")"
step "pause and resume"
timed "$bin" pause demo
timed "$bin" resume demo
step "console"
"$bin" logs demo | tail -n 3
step "halt (graceful, through the agent) and delete"
timed "$bin" halt demo
timed "$bin" delete demo --yes
step "done in $(( $(date +%s) - t0 )) s"
