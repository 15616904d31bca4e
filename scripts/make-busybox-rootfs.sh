#!/usr/bin/env bash
# Usage: make-busybox-rootfs.sh OUT.ext4 INIT_SCRIPT [SIZE]
# Builds an ext4 root disk from Debian's static busybox with INIT_SCRIPT as
# /init, using mkfs.ext4 -d (no root mount needed).
set -euo pipefail
out=$1
init=$2
size=${3:-32M}
busybox=$(command -v busybox || true)
for candidate in /bin/busybox /usr/bin/busybox "$busybox"; do
  if [ -n "$candidate" ] && [ -x "$candidate" ] && file "$candidate" | grep -q 'statically linked'; then
    busybox=$candidate
    break
  fi
done
if ! file "$busybox" 2>/dev/null | grep -q 'statically linked'; then
  echo "make-busybox-rootfs: a static busybox is needed (apt-get install busybox-static)" >&2
  exit 1
fi
tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
mkdir -p "$tree"/{bin,proc,sys,dev,mnt,tmp,etc,root,run}
cp "$busybox" "$tree/bin/busybox"
for applet in $("$tree/bin/busybox" --list); do
  [ "$applet" = busybox ] || ln -s busybox "$tree/bin/$applet"
done
install -m 0755 "$init" "$tree/init"
rm -f "$out.tmp"
mkfs.ext4 -q -F -d "$tree" "$out.tmp" "$size"
mv "$out.tmp" "$out"
