#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit and integration tests against a
# real RabbitMQ and s3s-fs (started/installed here when missing), the deployment
# files (promtool rule tests, Kubernetes schemas, docker-compose), and a smoke
# run of the benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/ensure-rabbitmq.sh
scripts/ensure-s3s-fs.sh
scripts/ensure-prometheus.sh

cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --lib --bins --tests --locked
scripts/check-deploy.sh
scripts/bench.sh --smoke
