#!/usr/bin/env bash
# Validate the deployment files: Prometheus config, alert rules and their unit
# tests (promtool), Kubernetes manifests, docker-compose.yml. Installs the tools
# it needs when they are missing (promtool from Debian's prometheus package;
# PyYAML, jsonschema and kubernetes-validate from PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v promtool >/dev/null 2>&1; then
  echo "installing promtool (Debian package prometheus)" >&2
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null
  else
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null
  fi
fi
if ! python3 -c 'import yaml, jsonschema' 2>/dev/null || ! command -v kubernetes-validate >/dev/null 2>&1; then
  echo "installing PyYAML, jsonschema, kubernetes-validate (PyPI)" >&2
  python3 -m pip install -q --disable-pip-version-check pyyaml jsonschema kubernetes-validate
fi

promtool check config deploy/prometheus/prometheus.yml
promtool check rules deploy/prometheus/rules/*.yml
promtool test rules deploy/prometheus/tests/*.test.yml
python3 scripts/check-deploy.py
