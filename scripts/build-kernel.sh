#!/usr/bin/env bash
# Build the microagent guest kernel from Debian's linux-source-6.1 with our
# config fragment and patches, into a cache outside git. Idempotent: the cache
# directory is keyed by the sha256 of everything that shapes the kernel, and a
# complete cache entry is reused as is.
#
# Prints the path of the cache entry on the last line of stdout
# ("kernel: <dir>"); vmlinux, bzImage, System.map, config and sha256 are in it.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cache_root=${MICROAGENT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/microagent}
fragment=$repo/kernels/microagent.config
src_tarball=/usr/src/linux-source-6.1.tar.xz
# Bump when a change to this script changes the kernel it produces (the key
# covers the fragment, patches and source version, not this file's text).
recipe_version=1
build_deps=(linux-source-6.1 build-essential flex bison bc libelf-dev libssl-dev xz-utils)

log() { echo "build-kernel: $*" >&2; }

missing=()
for p in "${build_deps[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing build dependencies: ${missing[*]}"
  if [ "$(id -u)" -ne 0 ]; then
    log "need root to install packages (run: sudo apt-get install ${missing[*]})"
    exit 1
  fi
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
fi

src_version=$(dpkg-query -W -f='${Version}' linux-source-6.1)
key=$( {
  echo "linux-source-6.1 $src_version recipe $recipe_version"
  sha256sum "$fragment"
  for p in "$repo"/kernels/patches/*.patch; do sha256sum "$p"; done
} | sed "s#$repo/##" | sha256sum | cut -c1-64)
out=$cache_root/kernels/$key

# Concurrent callers (parallel test binaries) wait for one build.
mkdir -p "$cache_root/kernels"
exec 9>"$cache_root/kernels/.lock"
flock 9

if [ -f "$out/sha256" ] && [ -f "$out/vmlinux" ] && [ -f "$out/bzImage" ]; then
  log "cached: $(cat "$out/sha256")  $out/vmlinux"
  ln -sfn "$key" "$cache_root/kernels/current"
  echo "kernel: $out"
  exit 0
fi

work=$(mktemp -d "$cache_root/kernels/.build-$key.XXXXXX")
trap 'rm -rf "$work"' EXIT
start=$(date +%s)
log "unpacking linux-source-6.1 $src_version"
tar -C "$work" -xf "$src_tarball"
src=$work/linux-source-6.1
for p in "$repo"/kernels/patches/*.patch; do
  log "applying $(basename "$p")"
  patch -d "$src" -p1 --quiet --forward < "$p"
done
log "configuring (allnoconfig + kernels/microagent.config)"
make -C "$src" -s KCONFIG_ALLCONFIG="$fragment" allnoconfig >&2
make -C "$src" -s olddefconfig >&2

# Every option the fragment asks for must survive Kconfig's dependency
# resolution; a silently dropped option is a kernel that will not boot.
bad=0
while IFS= read -r line; do
  case "$line" in
    CONFIG_*=*)
      grep -qxF "$line" "$src/.config" || { log "option not in final config: $line"; bad=1; } ;;
    "# CONFIG_"*" is not set")
      opt=${line#\# }; opt=${opt%% *}
      grep -q "^$opt=" "$src/.config" && { log "option should be off: $opt"; bad=1; } ;;
  esac
done < "$fragment"
[ $bad -eq 0 ] || exit 1

log "building vmlinux and bzImage with $(nproc) jobs"
make -C "$src" -s -j"$(nproc)" vmlinux bzImage >&2

stage=$work/out
mkdir -p "$stage"
cp "$src/vmlinux" "$stage/vmlinux"
cp "$src/arch/x86/boot/bzImage" "$stage/bzImage"
cp "$src/System.map" "$stage/System.map"
cp "$src/.config" "$stage/config"
echo "$src_version" > "$stage/source-version"
sha256sum "$stage/vmlinux" | cut -c1-64 > "$stage/sha256"
rm -rf "$out"
mv "$stage" "$out"
log "built in $(( $(date +%s) - start )) s: vmlinux sha256 $(cat "$out/sha256")"
# `current` is the default kernel of new workspaces.
ln -sfn "$key" "$cache_root/kernels/current"
echo "kernel: $out"
