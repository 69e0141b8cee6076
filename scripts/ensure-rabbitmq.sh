#!/usr/bin/env bash
# Make sure a RabbitMQ broker answers on 127.0.0.1:5672 (unless $TEST_AMQP_URL
# names another): install Debian's package when it is missing, start it with
# `rabbitmq-server -detached` when it is down.
set -euo pipefail

port_open() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }

if [ -n "${TEST_AMQP_URL:-}" ]; then
  exit 0 # an external broker was given; nothing to start
fi
if port_open && rabbitmqctl -q await_startup >/dev/null 2>&1; then
  exit 0
fi
if ! command -v rabbitmq-server >/dev/null 2>&1; then
  # A fresh machine: Debian's package (it starts the broker where systemd
  # runs; here it is started below either way).
  echo "installing RabbitMQ (Debian's rabbitmq-server, once per machine)" >&2
  apt-get update -qq >/dev/null || echo "apt-get update failed: installing from what apt already has" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server >/dev/null
fi
echo "starting RabbitMQ (rabbitmq-server -detached)" >&2
rabbitmq-server -detached >/dev/null 2>&1 || true
for _ in $(seq 1 60); do
  if port_open && rabbitmqctl -q await_startup >/dev/null 2>&1; then
    exit 0
  fi
  sleep 1
done
echo "RabbitMQ did not come up within 60 s" >&2
exit 1
