#!/usr/bin/env bash
# Run the worker against the local RabbitMQ (started when it is down).
# Settings come from LESSON_REPLAY_* variables; see docs/configuration.md.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/ensure-rabbitmq.sh
exec cargo run --release --locked -- worker "$@"
