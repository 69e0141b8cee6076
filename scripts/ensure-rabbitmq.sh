#!/usr/bin/env bash
# Make sure a RabbitMQ broker answers on 127.0.0.1:5672 (or $LESSON_REPLAY_TEST_AMQP_URL's
# host): start the local one with `rabbitmq-server -detached` when it is down.
set -euo pipefail

port_open() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }

if [ -n "${LESSON_REPLAY_TEST_AMQP_URL:-}" ]; then
  exit 0 # an external broker was given; nothing to start
fi
if port_open && rabbitmqctl -q await_startup >/dev/null 2>&1; then
  exit 0
fi
if ! command -v rabbitmq-server >/dev/null 2>&1; then
  echo "RabbitMQ is not running and not installed. Install it (Debian: apt-get install rabbitmq-server)" >&2
  echo "or point LESSON_REPLAY_TEST_AMQP_URL at a broker." >&2
  exit 1
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
