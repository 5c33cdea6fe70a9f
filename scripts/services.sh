#!/usr/bin/env bash
# Local services for cxone-offboard: RabbitMQ on 127.0.0.1:5672 and an S3-compatible server
# (moto) on 127.0.0.1:9000 with the bucket created. Installs what is missing, starts what is
# down, and is safe to run any number of times.
#
#   scripts/services.sh up       install if needed, start, create the bucket, print endpoints
#   scripts/services.sh down     stop what this script started
#   scripts/services.sh status   show what is running
#
# Environment: S3_PORT (9000), S3_BUCKET (cxone-offboard), SERVICES_DIR (.services).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${SERVICES_DIR:-$ROOT/.services}"
S3_HOST=127.0.0.1
S3_PORT="${S3_PORT:-9000}"
S3_BUCKET="${S3_BUCKET:-cxone-offboard}"
AMQP_PORT=5672
mkdir -p "$STATE"

log() { printf '[services] %s\n' "$*" >&2; }

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

wait_port() {
  local host=$1 port=$2 what=$3 tries=${4:-60}
  for _ in $(seq "$tries"); do
    port_open "$host" "$port" && return 0
    sleep 1
  done
  log "$what did not open $host:$port"
  return 1
}

apt_updated=""
apt_install() {
  if [ -z "$apt_updated" ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

rabbit_up() {
  if port_open 127.0.0.1 "$AMQP_PORT" && rabbitmqctl -q await_startup >/dev/null 2>&1; then
    log "rabbitmq already running"
    return 0
  fi
  if ! command -v rabbitmq-server >/dev/null 2>&1; then
    log "installing rabbitmq-server (apt)"
    apt_install rabbitmq-server
  fi
  if ! rabbitmqctl -q status >/dev/null 2>&1; then
    log "starting rabbitmq"
    rabbitmq-server -detached >/dev/null 2>&1 || true
    touch "$STATE/rabbitmq.started-by-us"
  else
    # Node up but the app stopped (e.g. after `rabbitmqctl stop_app`).
    rabbitmqctl -q start_app >/dev/null 2>&1 || true
  fi
  for _ in $(seq 60); do
    rabbitmqctl -q await_startup >/dev/null 2>&1 && break
    sleep 1
  done
  wait_port 127.0.0.1 "$AMQP_PORT" rabbitmq
  log "rabbitmq ready"
}

s3_running() { curl -s -o /dev/null --max-time 2 "http://$S3_HOST:$S3_PORT/" ; }

s3_up() {
  if s3_running; then
    log "s3 (moto) already running on $S3_HOST:$S3_PORT"
  else
    if ! python3 -c 'import moto.server, flask, flask_cors' >/dev/null 2>&1; then
      log "installing moto[server] (pip)"
      python3 -m pip install -q --disable-pip-version-check 'moto[server]>=5,<6'
    fi
    log "starting moto on $S3_HOST:$S3_PORT"
    nohup python3 -m moto.server -H "$S3_HOST" -p "$S3_PORT" >"$STATE/moto.log" 2>&1 &
    echo $! >"$STATE/moto.pid"
    wait_port "$S3_HOST" "$S3_PORT" moto 60
    for _ in $(seq 30); do s3_running && break; sleep 0.5; done
  fi
  python3 - "$S3_HOST" "$S3_PORT" "$S3_BUCKET" <<'PY'
import sys, boto3, botocore
host, port, bucket = sys.argv[1], sys.argv[2], sys.argv[3]
s3 = boto3.client("s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1",
                  aws_access_key_id="test", aws_secret_access_key="test")
try:
    s3.create_bucket(Bucket=bucket)
except botocore.exceptions.ClientError as e:
    if e.response["Error"]["Code"] not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
        raise
PY
  log "bucket $S3_BUCKET ready"
}

cmd_up() {
  rabbit_up
  s3_up
  cat <<OUT
AMQP      amqp://guest:guest@127.0.0.1:$AMQP_PORT/%2f
S3        http://$S3_HOST:$S3_PORT  bucket $S3_BUCKET  (any access key; e.g. AWS_ACCESS_KEY_ID=test)
export OFFBOARD__S3__ENDPOINT=http://$S3_HOST:$S3_PORT AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test
OUT
}

cmd_down() {
  if [ -f "$STATE/moto.pid" ]; then
    kill "$(cat "$STATE/moto.pid")" 2>/dev/null || true
    rm -f "$STATE/moto.pid"
    log "moto stopped"
  fi
  if [ -f "$STATE/rabbitmq.started-by-us" ]; then
    rabbitmqctl -q stop >/dev/null 2>&1 || true
    rm -f "$STATE/rabbitmq.started-by-us"
    log "rabbitmq stopped"
  fi
}

cmd_status() {
  local rc=0
  if port_open 127.0.0.1 "$AMQP_PORT"; then echo "rabbitmq  up    127.0.0.1:$AMQP_PORT"; else echo "rabbitmq  down"; rc=1; fi
  if s3_running; then echo "s3        up    http://$S3_HOST:$S3_PORT"; else echo "s3        down"; rc=1; fi
  return $rc
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
