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
step "building microagent"
cargo build --release --quiet
bin=$repo/target/release/microagent

step "building a busybox root disk"
mkdir -p "$cache/demo"
cat > "$cache/demo/init" <<'INIT'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
echo "hello from a microagent guest: $(uname -sr), $(grep -c ^processor /proc/cpuinfo) vCPUs, $(awk '/MemTotal/ {print $2}' /proc/meminfo) kB RAM"
echo "root disk: $(df -h / | awk 'NR==2 {print $2 " total, " $4 " free"}'); init ran at $(cut -d' ' -f1 /proc/uptime) s"
i=0
while true; do echo "guest alive: tick $i"; i=$((i+1)); sleep 2; done
INIT
bash scripts/make-busybox-rootfs.sh "$cache/demo/rootfs.ext4" "$cache/demo/init"

# A private state directory, so the demo never touches real workspaces.
export MICROAGENT_HOME=$cache/demo/home
export MICROAGENT_KERNEL=$kernel_dir/vmlinux
"$bin" delete demo --yes --force >/dev/null 2>&1 || true

timed() { local s; s=$(date +%s%N); "$@"; echo "    ($(( ($(date +%s%N) - s) / 1000000 )) ms)"; }
step "create: the workspace gets its own copy of the disk"
timed "$bin" create demo --rootfs "$cache/demo/rootfs.ext4" --vcpus 2 --memory 512 --disk-size 256M \
  --cmdline "quiet root=/dev/vda rw init=/init"
step "start: a detached VMM per workspace"
timed "$bin" start demo
"$bin" list
step "waiting for the guest to reach userspace (about a minute on PVM hosts)"
t1=$(date +%s)
until grep -q "guest alive" "$MICROAGENT_HOME/workspaces/demo/console.log" 2>/dev/null; do sleep 1; done
echo "    guest userspace after $(( $(date +%s) - t1 )) s"
"$bin" logs demo
step "pause and resume"
timed "$bin" pause demo
"$bin" status demo
timed "$bin" resume demo
step "halt and delete"
timed "$bin" halt demo
timed "$bin" delete demo --yes
step "done in $(( $(date +%s) - t0 )) s"
