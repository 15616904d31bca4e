#!/usr/bin/env bash
# Builds the default demo image: an OCI layout of Debian's static busybox,
# cached under ~/.cache/microagent/images/ (keyed by this script, the layout
# writer and the busybox binary). Prints the layout directory.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${MICROAGENT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/microagent}
busybox=/bin/busybox
if ! file "$busybox" 2>/dev/null | grep -q 'statically linked'; then
  echo "image-busybox: a static busybox is needed (apt-get install busybox-static)" >&2
  exit 1
fi
key=$(cat "$0" "$here/make-oci-layout.sh" "$busybox" | sha256sum | cut -c1-16)
out="$cache/images/busybox-$key"
if [ -f "$out/index.json" ]; then
  echo "$out"
  exit 0
fi
mkdir -p "$cache/images"
tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
mkdir -p "$tree"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,etc,root,run,var,home}
chmod 1777 "$tree/tmp"
cp "$busybox" "$tree/bin/busybox"
for applet in $("$tree/bin/busybox" --list); do
  [ "$applet" = busybox ] || ln -s busybox "$tree/bin/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' > "$tree/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' > "$tree/etc/group"
printf 'NAME="microagent busybox"\nID=busybox\nVERSION_ID=%s\n' \
  "$("$busybox" 2>&1 | head -1 | awk '{print $2}')" > "$tree/etc/os-release"
"$here/make-oci-layout.sh" "$out" latest "$tree"
echo "$out"
