#!/usr/bin/env bash
# Builds passt (the per-VM user-mode network) from Debian 13's source
# package into a cache outside git, keyed by version and this script, and
# points ~/.cache/microagent/passt/current at it. Prints the binary's path
# on the last line of stdout.
#
# Why not Debian 12's own passt (0.0~git20230309): it resets every
# guest-initiated TCP connection whose host peer sends nothing for 24 s
# (it never clears the handshake's ACK timer, so an upload to a silent
# sink dies after 24 s), and it loses its framing when a frame reaches it
# in two reads. Both are fixed upstream; 0.0~git20250503 builds here in
# about 20 s with nothing but a C compiler.
set -euo pipefail
version=0.0~git20250503.587980c
debian_version=$version-2+deb13u1
orig_sha256=69d5eb843f7d648c2cc60bfbca6ea7b5014c6b6f07cdee362c2a8cf490515a49
cache_root=${MICROAGENT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/microagent}
key=$(sha256sum "$0" | cut -c1-12)
out=$cache_root/passt/$version-$key
log() { echo "build-passt: $*" >&2; }

if [ -x "$out/passt" ]; then
  ln -sfn "$out" "$cache_root/passt/current"
  echo "$out/passt"
  exit 0
fi
missing=()
for p in build-essential xz-utils; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    log "need root to install packages (run: sudo apt-get install ${missing[*]})"
    exit 1
  fi
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# A private apt configuration that knows trixie's source index: nothing
# in the system's apt sources changes.
mkdir -p "$work/sources" "$work/lists/partial"
cat > "$work/sources/trixie-src.sources" <<'SRC'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
apt_opts=(-o Dir::Etc::SourceList=/dev/null -o "Dir::Etc::SourceParts=$work/sources"
  -o "Dir::State::Lists=$work/lists" -o APT::Sandbox::User=root)
log "fetching passt $debian_version source (Debian 13)"
apt-get "${apt_opts[@]}" update -qq >&2
# Some mirrors lack the .dsc: the upstream tarball is what we build, and
# its sha256 is checked below whatever apt says.
(cd "$work" && apt-get "${apt_opts[@]}" source --download-only "passt=$debian_version" >&2) || true
tarball=$work/passt_$version.orig.tar.xz
if [ ! -f "$tarball" ]; then
  log "could not download passt_$version.orig.tar.xz from Debian"
  exit 1
fi
echo "$orig_sha256  $tarball" | sha256sum -c --quiet - >&2
tar -C "$work" -xf "$tarball"
src=$(find "$work" -maxdepth 1 -type d -name 'passt-*' | head -1)
log "building passt in $src"
make -C "$src" -j"$(nproc)" passt >/dev/null
mkdir -p "$cache_root/passt"
rm -rf "$out.tmp"
mkdir -p "$out.tmp"
install -m 0755 "$src/passt" "$out.tmp/passt"
mv "$out.tmp" "$out"
ln -sfn "$out" "$cache_root/passt/current"
echo "$out/passt"
