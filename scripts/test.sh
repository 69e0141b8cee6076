#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit and integration tests against a
# real RabbitMQ (3.10, then the broker-facing tests again on a 4.0 node), s3s-fs
# and moto's S3 server (started/installed here when missing), the deployment
# files (promtool rule tests, Kubernetes schemas, docker-compose), and a smoke
# run of the benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/ensure-rabbitmq.sh
scripts/ensure-s3s-fs.sh
scripts/ensure-moto.sh
scripts/ensure-browser.sh
scripts/ensure-prometheus.sh
scripts/ensure-webhook-receiver.sh

cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --lib --bins --tests --locked
# The broker-facing tests again, on RabbitMQ 4.0 (production's major version):
# a node of its own beside the machine's 3.10 (docs/operations.md, "Versions tested").
rabbitmq4_url="$(scripts/ensure-rabbitmq4.sh)"
TEST_AMQP_URL="$rabbitmq4_url" cargo test --locked \
  --test worker --test guarantees --test faults --test hostile --test ingress \
  --test watches --test archive_worker --test orphans --test observability --test apps \
  --test webhooks
scripts/check-deploy.sh
scripts/bench.sh --smoke
