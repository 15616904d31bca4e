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
echo "root disk: $(df -h / | awk 'NR==2 {print $2 " total, " $4 " free"}')"
echo "uptime when init ran: $(cut -d' ' -f1 /proc/uptime) s"
reboot -f
INIT
bash scripts/make-busybox-rootfs.sh "$cache/demo/rootfs.ext4" "$cache/demo/init"

step "booting (2 vCPUs, 512 MiB); on PVM hosts this takes about a minute"
t1=$(date +%s)
"$bin" vmm run --kernel "$kernel_dir/vmlinux" --rootfs "$cache/demo/rootfs.ext4" \
  --vcpus 2 --memory 512 --cmdline "quiet root=/dev/vda rw init=/init"
step "done: guest ran for $(( $(date +%s) - t1 )) s; whole demo $(( $(date +%s) - t0 )) s"
