#!/usr/bin/env bash
# A three-node RabbitMQ cluster on loopback for the cluster chaos scenarios (RELIABILITY.md
# (e)-(g)), beside the machine's own broker, which keeps 5672 and is never touched.
#
#   scripts/cluster.sh up          start nodes c1..c3@localhost on 127.0.0.1:5681..5683 and join them
#   scripts/cluster.sh down        stop every node and delete the cluster's directory
#   scripts/cluster.sh kill N      kill -9 node N's Erlang VM (a crash)
#   scripts/cluster.sh stop N      stop node N cleanly
#   scripts/cluster.sh start N     start node N again (it rejoins the cluster)
#   scripts/cluster.sh leader Q    the node leading quorum queue Q (e.g. offboard.requests), as N
#   scripts/cluster.sh url         the comma-separated amqp.url of all nodes
#   scripts/cluster.sh status      which nodes run
#
# Environment: CLUSTER_DIR (default /tmp/cxone-offboard-cluster), CLUSTER_NODES (3).
# Needs the Debian rabbitmq-server package (scripts/services.sh installs it).
set -euo pipefail

D="${CLUSTER_DIR:-/tmp/cxone-offboard-cluster}"
NODES="${CLUSTER_NODES:-3}"
# The system broker's Erlang cookie (rabbitmqctl and the nodes must share it).
export HOME=/var/lib/rabbitmq

log() { printf '[cluster] %s\n' "$*" >&2; }
port() { echo $((5680 + $1)); }
node() { echo "c$1@localhost"; }
ctl() { local n="$1"; shift; rabbitmqctl -q -n "$(node "$n")" "$@"; }

check_n() {
  [[ "${1:-}" =~ ^[0-9]+$ ]] && [ "$1" -ge 1 ] && [ "$1" -le "$NODES" ] || {
    log "node number 1..$NODES expected, got '${1:-}'"
    exit 2
  }
}

running() { ctl "$1" await_startup --timeout 1 >/dev/null 2>&1; }

start_node() {
  local n="$1" dir="$D/n$1"
  mkdir -p "$dir/mnesia" "$dir/log"
  chmod 777 "$D" "$dir" "$dir/mnesia" "$dir/log"
  cat > "$dir/rabbitmq.conf" <<EOF
listeners.tcp.1 = 127.0.0.1:$(port "$n")
loopback_users = none
EOF
  echo '[].' > "$dir/plugins"
  chmod 666 "$dir/rabbitmq.conf" "$dir/plugins"
  RABBITMQ_CONFIG_FILE="$dir/rabbitmq" RABBITMQ_NODENAME="$(node "$n")" \
    RABBITMQ_NODE_PORT="$(port "$n")" RABBITMQ_DIST_PORT="$((25680 + n))" \
    RABBITMQ_MNESIA_BASE="$dir/mnesia" RABBITMQ_LOG_BASE="$dir/log" \
    RABBITMQ_PID_FILE="$dir/pid" RABBITMQ_ENABLED_PLUGINS_FILE="$dir/plugins" \
    rabbitmq-server -detached >/dev/null 2>&1 || true
  local i
  for i in $(seq 1 60); do
    running "$n" && return 0
    sleep 1
  done
  log "node $(node "$n") did not start; see $dir/log"
  exit 1
}

up() {
  command -v rabbitmq-server >/dev/null || {
    log "rabbitmq-server is not installed: run scripts/services.sh up rabbitmq first"
    exit 1
  }
  local n
  for n in $(seq 1 "$NODES"); do
    if running "$n"; then
      log "$(node "$n") already running"
    else
      log "starting $(node "$n") on 127.0.0.1:$(port "$n")"
      start_node "$n"
    fi
  done
  for n in $(seq 2 "$NODES"); do
    if ! ctl "$n" cluster_status --formatter json 2>/dev/null | grep -q "\"$(node 1)\""; then
      log "joining $(node "$n") to $(node 1)"
      {
        ctl "$n" stop_app
        ctl "$n" reset
        ctl "$n" join_cluster "$(node 1)"
        ctl "$n" start_app
      } >/dev/null 2>&1 || { log "joining $(node "$n") failed"; exit 1; }
    fi
  done
  ctl 1 await_online_nodes "$NODES" >/dev/null
  log "cluster up: $(url)"
}

down() {
  local n
  for n in $(seq 1 "$NODES"); do
    if running "$n"; then
      ctl "$n" stop >/dev/null 2>&1 || true
    fi
    kill_node "$n" quiet
  done
  rm -rf "$D"
  log "cluster down, $D removed"
}

# The pid of node N's Erlang VM, checked against the environment it was started with (a pid
# file can outlive its process and the number be reused; the system broker never matches).
node_pid() {
  local n="$1" pid
  for pid in $(cat "$D/n$n/pid" 2>/dev/null) $(pgrep -x beam.smp || true); do
    if [ -r "/proc/$pid/environ" ] \
      && tr '\0' '\n' < "/proc/$pid/environ" | grep -qx "RABBITMQ_NODENAME=$(node "$n")"; then
      echo "$pid"
      return 0
    fi
  done
  return 1
}

kill_node() {
  local n="$1" pid
  if pid="$(node_pid "$n")"; then
    kill -9 "$pid"
    [ "${2:-}" = quiet ] || log "killed $(node "$n") (pid $pid)"
  elif [ "${2:-}" != quiet ]; then
    log "$(node "$n") is not running"
  fi
}

leader() {
  local q="$1" n
  for n in $(seq 1 "$NODES"); do
    if running "$n"; then
      # "leader" in 3.x / 4.x: the member whose raft state is leader.
      local who
      who="$(rabbitmq-queues -q -n "$(node "$n")" quorum_status "$q" --formatter json 2>/dev/null \
        | python3 -c 'import json,sys
rows=json.load(sys.stdin)
print(next((r.get("Node Name") or r.get("node_name") or "" for r in rows if str(r.get("Raft State") or r.get("raft_state")).lower()=="leader"), ""))' || true)"
      if [ -n "$who" ]; then
        echo "${who#c}" | cut -d@ -f1
        return 0
      fi
    fi
  done
  log "no leader found for $q"
  exit 1
}

url() {
  local n urls=()
  for n in $(seq 1 "$NODES"); do
    urls+=("amqp://guest:guest@127.0.0.1:$(port "$n")/%2f")
  done
  (IFS=,; echo "${urls[*]}")
}

status() {
  local n
  for n in $(seq 1 "$NODES"); do
    if running "$n"; then echo "$(node "$n") up 127.0.0.1:$(port "$n")"; else echo "$(node "$n") down"; fi
  done
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  kill) check_n "${2:-}"; kill_node "$2" ;;
  stop) check_n "${2:-}"; ctl "$2" stop; log "stopped $(node "$2")" ;;
  start) check_n "${2:-}"; start_node "$2"; log "started $(node "$2")" ;;
  leader) [ -n "${2:-}" ] || { log "leader QUEUE"; exit 2; }; leader "$2" ;;
  url) url ;;
  status) status ;;
  *) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
