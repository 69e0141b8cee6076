#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests and the integration tests
# against a real RabbitMQ (started here when it is not running).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/ensure-rabbitmq.sh
scripts/ensure-s3s-fs.sh

cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --all-targets --locked
