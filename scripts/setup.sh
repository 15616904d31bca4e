#!/usr/bin/env bash
# Installs the Debian packages microagent's build, demo and tests need
# (the kernel build's own dependencies are installed by build-kernel.sh).
# Runs apt-get update before installing; does nothing if all are present.
set -euo pipefail
# docker-registry, skopeo and apache2-utils (htpasswd) serve test images from a
# local registry; debootstrap builds the Debian minbase image.
packages=(busybox-static e2fsprogs erofs-utils file util-linux xfsprogs docker-registry skopeo apache2-utils debootstrap passt python3 curl)
# The benchmarks: QEMU beside us, and perf for the exec bench's KVM counts.
if [ "${1:-}" = "--with-qemu" ]; then
  packages+=(qemu-system-x86 linux-perf)
fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
echo "setup: installing ${missing[*]}" >&2
if [ "$(id -u)" -ne 0 ]; then
  echo "setup: need root to install packages (sudo apt-get install ${missing[*]})" >&2
  exit 1
fi
apt-get update -qq >&2
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
