#!/usr/bin/env bash
# Install what the replay page's browser tests need when it is missing:
# Chromium (headless; Debian's package, no browser download at test time) and
# ffmpeg (it makes the fixture videos) with a font for their frame counters.
set -euo pipefail
missing=()
command -v "${CHROMIUM_BIN:-chromium}" >/dev/null 2>&1 || missing+=(chromium)
command -v ffmpeg >/dev/null 2>&1 || missing+=(ffmpeg)
# ffmpeg's drawtext (the fixtures' frame counter) needs a font.
fc-list 2>/dev/null | grep -q . || missing+=(fonts-dejavu-core)
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
echo "installing ${missing[*]} (Debian packages, once per machine)" >&2
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
