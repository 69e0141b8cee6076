#!/usr/bin/env bash
# Install moto's S3 server when it is missing: the second S3-compatible store
# of the tests, for what s3s-fs 0.14 lacks (ListMultipartUploads, lifecycle
# rules). Pinned, in a virtualenv of its own; `moto_server` ends up in
# $MOTO_VENV/bin (default ~/.cache/lesson-replay/moto).
set -euo pipefail
version=5.1.0
venv="${MOTO_VENV:-$HOME/.cache/lesson-replay/moto}"
if [ -x "$venv/bin/moto_server" ] && "$venv/bin/pip" show moto 2>/dev/null | grep -x "Version: $version" >/dev/null; then
  exit 0
fi
if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
  echo "installing python3-venv (once per machine)" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
fi
echo "installing moto $version (once per machine)" >&2
python3 -m venv "$venv"
"$venv/bin/pip" install -q "moto[server]==$version"
