#!/usr/bin/env bash
# Unpacks Debian's Redis server and the libraries it needs beyond a
# bookworm minbase (apt-get download + dpkg-deb -x: nothing is installed
# on the host) into a directory tree, cached under
# ~/.cache/microagent/trees/ (keyed by this script). The tests layer it
# over scripts/image-debian.sh's image. Prints the tree's directory.
set -euo pipefail
cache=${MICROAGENT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/microagent}
key=$(sha256sum "$0" | cut -c1-16)
out="$cache/trees/redis-$key"
if [ -x "$out/usr/bin/redis-check-rdb" ]; then
  echo "$out"
  exit 0
fi
mkdir -p "$cache/trees"
work=$(mktemp -d "$cache/trees/.redis.XXXXXX")
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download -q -o APT::Sandbox::User=root \
  redis-server redis-tools libatomic1 libjemalloc2 liblzf1 libssl3 >&2)
mkdir "$work/tree"
for deb in "$work"/*.deb; do
  dpkg-deb -x "$deb" "$work/tree"
done
rm -rf "$work/tree/usr/share/doc" "$work/tree/usr/share/man" "$work/tree/etc/init.d" \
  "$work/tree/lib/systemd" "$work/tree/usr/lib/systemd"
# The image is merged-/usr (/lib, /bin are links into /usr): a real
# directory in a layer would hide the link and everything behind it.
for d in bin sbin lib lib64; do
  if [ -d "$work/tree/$d" ] && [ ! -L "$work/tree/$d" ]; then
    mkdir -p "$work/tree/usr/$d"
    cp -a "$work/tree/$d/." "$work/tree/usr/$d/"
    rm -rf "${work:?}/tree/$d"
  fi
done
rm -rf "$out"
mv "$work/tree" "$out"
echo "$out"
