#!/usr/bin/env bash
# Builds the guest agent as a static x86_64 binary (glibc, +crt-static: no
# extra toolchain needed) and puts a copy next to the microagent binaries
# (target/debug, target/release), where microagent looks for it. The
# hostile guest program the tests copy into a guest comes along.
# Prints "agent: <path>" on the last line.
set -euo pipefail
cd "$(dirname "$0")/.."
target=x86_64-unknown-linux-gnu
# A separate target dir: the static flag must not leak into host builds.
RUSTFLAGS="-C target-feature=+crt-static" cargo build --quiet --release \
  -p microagent-guest-agent --bin microagent-agent --bin microagent-hostile \
  --target "$target" --target-dir target/agent
bin=target/agent/$target/release/microagent-agent
if ! file "$bin" | grep -q 'static'; then
  echo "build-agent: $bin is not statically linked" >&2
  exit 1
fi
for d in target/debug target/release; do
  mkdir -p "$d"
  cp "$bin" "$d/microagent-agent.tmp" && mv "$d/microagent-agent.tmp" "$d/microagent-agent"
  # Stripped: tests copy it into a guest, where every byte costs.
  strip -o "$d/microagent-hostile.tmp" "target/agent/$target/release/microagent-hostile" &&
    mv "$d/microagent-hostile.tmp" "$d/microagent-hostile"
done
echo "agent: $(pwd)/$bin"
