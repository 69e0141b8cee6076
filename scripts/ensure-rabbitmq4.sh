#!/usr/bin/env bash
# A RabbitMQ 4 node for the tests, beside the machine's own broker: Debian
# trixie's rabbitmq-server 4.0.x with its Erlang, in a root of its own built
# once per machine with debootstrap (~370 MB, 2-3 min), run with chroot on
# ports, node name, cookie and data directory of its own. It registers with
# the machine's epmd, so the machine's broker is never touched.
#
#   scripts/ensure-rabbitmq4.sh          create if missing, start if down; prints the AMQP URL
#   scripts/ensure-rabbitmq4.sh stop     stop the node (by its PID)
#
# Settings (environment): RABBITMQ4_ROOT (default /var/cache/lesson-replay/rabbitmq4),
# RABBITMQ4_PORT (AMQP, default 5682), RABBITMQ4_DIST_PORT (default 25682).
set -euo pipefail

ROOT="${RABBITMQ4_ROOT:-/var/cache/lesson-replay/rabbitmq4}"
PORT="${RABBITMQ4_PORT:-5682}"
DIST_PORT="${RABBITMQ4_DIST_PORT:-25682}"
NODE="lesson-replay-rmq4@localhost"
HOME_IN_ROOT=/var/lib/lesson-replay-rmq4
URL="amqp://guest:guest@127.0.0.1:${PORT}/%2f"
log() { echo "rabbitmq4: $*" >&2; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Run a command inside the root as the node's own environment sees it.
in_root() {
  chroot "$ROOT" /usr/bin/env -i \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME="$HOME_IN_ROOT" LANG=C.UTF-8 \
    RABBITMQ_NODENAME="$NODE" \
    RABBITMQ_NODE_PORT="$PORT" \
    RABBITMQ_DIST_PORT="$DIST_PORT" \
    RABBITMQ_MNESIA_BASE="$HOME_IN_ROOT/mnesia" \
    RABBITMQ_LOG_BASE="$HOME_IN_ROOT/log" \
    RABBITMQ_PID_FILE="$HOME_IN_ROOT/node.pid" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$HOME_IN_ROOT/enabled_plugins" \
    RABBITMQ_CONFIG_FILE="$HOME_IN_ROOT/rabbitmq" \
    RABBITMQ_ADVANCED_CONFIG_FILE="$HOME_IN_ROOT/advanced.config" \
    RABBITMQ_CONF_ENV_FILE="$HOME_IN_ROOT/rabbitmq-env.conf" \
    "$@"
}

mount_binds() {
  mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
  mountpoint -q "$ROOT/dev" || mount --bind /dev "$ROOT/dev"
}

create() {
  if [ -x "$ROOT/usr/sbin/rabbitmq-server" ]; then
    return
  fi
  if ! command -v debootstrap >/dev/null 2>&1; then
    log "installing debootstrap"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
  fi
  log "building a Debian trixie root with rabbitmq-server in $ROOT (once per machine, 2-3 min)"
  rm -rf "$ROOT.partial"
  mkdir -p "$(dirname "$ROOT")"
  debootstrap --variant=minbase --include=rabbitmq-server trixie "$ROOT.partial" \
    http://deb.debian.org/debian >"$ROOT.partial.log" 2>&1 || {
    log "debootstrap failed; its log: $ROOT.partial.log"
    tail -20 "$ROOT.partial.log" >&2
    exit 1
  }
  mv "$ROOT.partial" "$ROOT"
}

configure() {
  local home="$ROOT$HOME_IN_ROOT"
  mkdir -p "$home/log" "$home/mnesia"
  # A cookie of its own: the node's distribution is private to this root.
  [ -s "$home/.erlang.cookie" ] || head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$home/.erlang.cookie"
  chmod 400 "$home/.erlang.cookie"
  # No management plugin, no other listener than AMQP and distribution.
  echo "[]." >"$home/enabled_plugins"
  cat >"$home/rabbitmq.conf" <<EOF
listeners.tcp.default = 127.0.0.1:${PORT}
loopback_users = none
EOF
  echo "[]." >"$home/advanced.config"
  : >"$home/rabbitmq-env.conf"
  # The package's scripts run the node and rabbitmqctl as its `rabbitmq` user.
  chroot "$ROOT" chown -R rabbitmq:rabbitmq "$HOME_IN_ROOT"
}

running() {
  port_open "$PORT" && in_root rabbitmqctl -q -n "$NODE" await_startup >/dev/null 2>&1
}

start() {
  create
  configure
  mount_binds
  if running; then
    echo "$URL"
    return
  fi
  log "starting node $NODE on 127.0.0.1:$PORT"
  in_root rabbitmq-server -detached >/dev/null 2>&1 || true
  for _ in $(seq 1 90); do
    if running; then
      echo "$URL"
      return
    fi
    sleep 1
  done
  log "the node did not come up within 90 s; its logs: $ROOT$HOME_IN_ROOT/log"
  tail -30 "$ROOT$HOME_IN_ROOT/log/"*.log >&2 2>/dev/null || true
  exit 1
}

stop() {
  local pidfile="$ROOT$HOME_IN_ROOT/node.pid"
  if [ -s "$pidfile" ]; then
    kill "$(cat "$pidfile")" 2>/dev/null || true
    for _ in $(seq 1 30); do
      kill -0 "$(cat "$pidfile")" 2>/dev/null || break
      sleep 1
    done
    rm -f "$pidfile"
  fi
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  *)
    echo "usage: $0 [start|stop]" >&2
    exit 2
    ;;
esac
