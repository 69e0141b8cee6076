#!/usr/bin/env bash
# Install rclone when it is missing: the baseline of benchmark scenario 9
# (`rclone copyurl` origin → S3 through the same WAN proxies as the worker).
# Debian's package; nothing to do when `rclone` is already on the PATH.
set -euo pipefail
if command -v rclone >/dev/null 2>&1; then
  exit 0
fi
echo "installing rclone (Debian package rclone, once per machine)" >&2
if [ "$(id -u)" = 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rclone >/dev/null
else
  sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rclone >/dev/null
fi
