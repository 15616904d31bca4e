#!/usr/bin/env bash
# Usage: make-oci-layout.sh OUT_DIR REF_NAME LAYER_DIR [LAYER_DIR...]
# Writes an OCI image layout (oci-layout, index.json, blobs/sha256/...) with
# one gzip layer per LAYER_DIR, in order (later layers on top; files named
# .wh.NAME / .wh..wh..opq are OCI whiteouts). The image runs /bin/sh.
# Environment: IMAGE_ENV (extra "K=V" lines), IMAGE_WORKDIR, IMAGE_USER.
set -euo pipefail
out=$1
name=$2
shift 2
[ $# -ge 1 ] || { echo "make-oci-layout: at least one layer directory" >&2; exit 2; }
tmp="$out.tmp.$$"
rm -rf "$tmp"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/blobs/sha256"

sha() { sha256sum "$1" | cut -d' ' -f1; }
size() { stat -c %s "$1"; }
blob() { # move file into blobs/, print its hex digest
  local h
  h=$(sha "$1")
  mv "$1" "$tmp/blobs/sha256/$h"
  echo "$h"
}

layers=""
diff_ids=""
for dir in "$@"; do
  # Numeric owners and xattrs as they are; sorted names make the layer
  # reproducible for the same tree.
  tar -C "$dir" --numeric-owner --xattrs --sort=name -cf "$tmp/layer.tar" .
  diff_ids="$diff_ids${diff_ids:+,}\"sha256:$(sha "$tmp/layer.tar")\""
  gzip -n -6 "$tmp/layer.tar"
  sz=$(size "$tmp/layer.tar.gz")
  h=$(blob "$tmp/layer.tar.gz")
  layers="$layers${layers:+,}{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar+gzip\",\"digest\":\"sha256:$h\",\"size\":$sz}"
done

env_json="\"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\""
while IFS= read -r kv; do
  [ -n "$kv" ] && env_json="$env_json,\"$kv\""
done <<< "${IMAGE_ENV:-}"
extra=""
[ -n "${IMAGE_WORKDIR:-}" ] && extra="$extra,\"WorkingDir\":\"$IMAGE_WORKDIR\""
[ -n "${IMAGE_USER:-}" ] && extra="$extra,\"User\":\"$IMAGE_USER\""
printf '{"architecture":"amd64","os":"linux","config":{"Env":[%s],"Cmd":["/bin/sh"]%s},"rootfs":{"type":"layers","diff_ids":[%s]}}' \
  "$env_json" "$extra" "$diff_ids" > "$tmp/config.json"
csz=$(size "$tmp/config.json")
ch=$(blob "$tmp/config.json")
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[%s]}' \
  "$ch" "$csz" "$layers" > "$tmp/manifest.json"
msz=$(size "$tmp/manifest.json")
mh=$(blob "$tmp/manifest.json")
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"annotations":{"org.opencontainers.image.ref.name":"%s"},"platform":{"architecture":"amd64","os":"linux"}}]}' \
  "$mh" "$msz" "$name" > "$tmp/index.json"
echo '{"imageLayoutVersion":"1.0.0"}' > "$tmp/oci-layout"
rm -rf "$out"
mv "$tmp" "$out"
trap - EXIT
