#!/usr/bin/env bash
# Regenerate the small MP4 fixtures in tests/fixtures/ (needs ffmpeg; the files are
# committed, so the tests do not). Two layouts the worker must handle: "faststart"
# (moov before mdat) and moov at the end (ffmpeg's default), different durations.
set -euo pipefail
cd "$(dirname "$0")/../tests/fixtures"

make() { # name duration size faststart?
  local name=$1 seconds=$2 size=$3 movflags=()
  [ "$4" = yes ] && movflags=(-movflags +faststart)
  ffmpeg -loglevel error -y -f lavfi -i "testsrc=size=${size}:rate=10:duration=${seconds}" \
    -c:v libx264 -preset veryfast -crf 40 -pix_fmt yuv420p -g 10 \
    "${movflags[@]}" -f mp4 "$name"
}

make faststart-2s-320x240.mp4 2 320x240 yes
make moov-at-end-5s-160x120.mp4 5 160x120 no
ls -l ./*.mp4
