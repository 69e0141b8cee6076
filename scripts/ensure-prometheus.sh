#!/usr/bin/env bash
# Make sure Prometheus (the server, for a test against a real Prometheus) and
# promtool (the rule tests) are installed: Debian's package `prometheus`.
set -euo pipefail
if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
  exit 0
fi
echo "installing prometheus and promtool (Debian package prometheus)" >&2
if [ "$(id -u)" = 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null
else
  sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null
fi
