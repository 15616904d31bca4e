#!/usr/bin/env bash
# Builds a Debian bookworm minbase image (debootstrap: glibc, apt, bash) as an
# OCI layout, cached under ~/.cache/microagent/images/ (keyed by this script
# and the layout writer). Prints the layout directory. Needs the Debian
# mirror (apt's own) and root.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${MICROAGENT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/microagent}
suite=${DEBIAN_SUITE:-bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
key=$(cat "$0" "$here/make-oci-layout.sh" | sha256sum | cut -c1-16)
out="$cache/images/debian-$suite-$key"
if [ -f "$out/index.json" ]; then
  echo "$out"
  exit 0
fi
command -v debootstrap >/dev/null || { echo "image-debian: apt-get install debootstrap" >&2; exit 1; }
mkdir -p "$cache/images"
tree=$(mktemp -d "$cache/images/.debootstrap.XXXXXX")
trap 'rm -rf "$tree"' EXIT
echo "image-debian: debootstrap --variant=minbase $suite (a few minutes)" >&2
debootstrap --variant=minbase "$suite" "$tree" "$mirror" > "$tree.log" 2>&1 || {
  tail -20 "$tree.log" >&2
  exit 1
}
rm -f "$tree.log"
# Not needed in an image; keeps the layer small.
rm -rf "$tree"/var/cache/apt/archives/*.deb "$tree"/var/lib/apt/lists/* "$tree"/usr/share/doc/* \
  "$tree"/usr/share/man/* "$tree"/usr/share/locale/*
"$here/make-oci-layout.sh" "$out" "$suite" "$tree"
echo "$out"
