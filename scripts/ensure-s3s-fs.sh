#!/usr/bin/env bash
# Install the S3 test server, s3s-fs, when it is missing. Pinned: later versions
# need a newer rustc than this project's.
set -euo pipefail
version=0.14.1
bin="${CARGO_HOME:-$HOME/.cargo}/bin/s3s-fs"
if [ -n "${S3S_FS_BIN:-}" ] && [ -x "$S3S_FS_BIN" ]; then
  exit 0
fi
if [ -x "$bin" ] && "$bin" --version 2>/dev/null | grep -q "$version"; then
  exit 0
fi
echo "installing s3s-fs $version (once per machine)" >&2
cargo install "s3s-fs@$version" --features binary --locked
