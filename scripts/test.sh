#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit and integration tests against a
# real RabbitMQ, s3s-fs and moto's S3 server (started/installed here when missing), the deployment
# files (promtool rule tests, Kubernetes schemas, docker-compose), and a smoke
# run of the benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/ensure-rabbitmq.sh
scripts/ensure-s3s-fs.sh
scripts/ensure-moto.sh
scripts/ensure-browser.sh
scripts/ensure-prometheus.sh

cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --lib --bins --tests --locked
scripts/check-deploy.sh
scripts/bench.sh --smoke
