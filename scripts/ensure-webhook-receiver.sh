#!/usr/bin/env bash
# Install the Standard Webhooks reference library when it is missing: the
# independent verifier behind scripts/webhook-receiver.py, the HTTP receiver
# the tests deliver to (it checks the signatures the worker sends and plays
# the faults a school's endpoint can show). Pinned, in a virtualenv of its
# own; run the receiver with $WEBHOOK_VENV/bin/python (default
# ~/.cache/lesson-replay/webhooks).
set -euo pipefail
version=1.3.0
venv="${WEBHOOK_VENV:-$HOME/.cache/lesson-replay/webhooks}"
if [ -x "$venv/bin/python" ] && "$venv/bin/pip" show standardwebhooks 2>/dev/null | grep -x "Version: $version" >/dev/null; then
  # (grep reads all of pip's output: with -q it would quit early, pip would die
  # of the broken pipe and pipefail would call the install missing)
  exit 0
fi
if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
  echo "installing python3-venv (once per machine)" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
fi
echo "installing standardwebhooks $version (once per machine)" >&2
python3 -m venv "$venv"
"$venv/bin/pip" install -q "standardwebhooks==$version"
