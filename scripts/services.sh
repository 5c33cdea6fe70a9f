#!/usr/bin/env bash
# Local services for cxone-offboard: RabbitMQ on 127.0.0.1:5672, Redis on 127.0.0.1:6379 (the
# shared CXone quota), moto on 127.0.0.1:9000 (S3) and s3s-fs on 127.0.0.1:9001 (an S3 server
# that verifies signatures and checksums and has no ListMultipartUploads), each with the
# bucket created. Installs what is missing (apt, pip, cargo install), starts what is down, and
# is safe to run any number of times.
#
#   scripts/services.sh up [SERVICE...]   install if needed, start, create buckets, print endpoints
#                                         SERVICE: rabbitmq redis moto s3s-fs (default: all)
#   scripts/services.sh down              stop what this script started
#   scripts/services.sh status            show what is running
#
# Environment: S3_PORT (9000), S3S_PORT (9001), REDIS_PORT (6379), S3_BUCKET (cxone-offboard),
# SERVICES_DIR (.services).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${SERVICES_DIR:-$ROOT/.services}"
S3_HOST=127.0.0.1
S3_PORT="${S3_PORT:-9000}"
S3_BUCKET="${S3_BUCKET:-cxone-offboard}"
AMQP_PORT=5672
S3S_PORT="${S3S_PORT:-9001}"
REDIS_PORT="${REDIS_PORT:-6379}"
# s3s-fs checks SigV4: these are the keys the tests and the Makefile use for both S3 servers.
S3_ACCESS_KEY=test
S3_SECRET_KEY=test
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

redis_up() {
  if command -v redis-cli >/dev/null 2>&1 && redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG; then
    log "redis already running"
    return 0
  fi
  if ! command -v redis-server >/dev/null 2>&1; then
    log "installing redis-server (apt)"
    apt_install redis-server
  fi
  log "starting redis on 127.0.0.1:$REDIS_PORT"
  redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save '' --appendonly no --daemonize yes \
    --pidfile "$STATE/redis.pid" --logfile "$STATE/redis.log" >/dev/null
  touch "$STATE/redis.started-by-us"
  wait_port 127.0.0.1 "$REDIS_PORT" redis 30
  for _ in $(seq 30); do
    redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG && break
    sleep 0.5
  done
  log "redis ready"
}

s3s_running() { curl -s -o /dev/null --max-time 2 "http://$S3_HOST:$S3S_PORT/" ; }

s3s_up() {
  if s3s_running; then
    log "s3s-fs already running on $S3_HOST:$S3S_PORT"
  else
    export PATH="$HOME/.cargo/bin:$PATH"
    if ! command -v s3s-fs >/dev/null 2>&1; then
      # 0.14.1: the last release that builds with rustc 1.95 (SERVICES.md).
      log "installing s3s-fs (cargo install, a few minutes)"
      cargo install --quiet s3s-fs --version 0.14.1 --features binary --locked
    fi
    mkdir -p "$STATE/s3s-fs"
    log "starting s3s-fs on $S3_HOST:$S3S_PORT"
    nohup s3s-fs --host "$S3_HOST" --port "$S3S_PORT" --access-key "$S3_ACCESS_KEY" \
      --secret-key "$S3_SECRET_KEY" "$STATE/s3s-fs" >"$STATE/s3s-fs.log" 2>&1 &
    echo $! >"$STATE/s3s-fs.pid"
    wait_port "$S3_HOST" "$S3S_PORT" s3s-fs 60
  fi
  # A bucket is a directory to s3s-fs.
  mkdir -p "$STATE/s3s-fs/$S3_BUCKET"
  log "s3s-fs bucket $S3_BUCKET ready"
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
  local want=("$@")
  [ ${#want[@]} -eq 0 ] && want=(rabbitmq redis moto s3s-fs)
  for service in "${want[@]}"; do
    case "$service" in
      rabbitmq) rabbit_up ;;
      redis) redis_up ;;
      moto|s3) s3_up ;;
      s3s-fs) s3s_up ;;
      *) log "unknown service $service (rabbitmq, redis, moto, s3s-fs)"; exit 2 ;;
    esac
  done
  cat <<OUT
AMQP      amqp://guest:guest@127.0.0.1:$AMQP_PORT/%2f
Redis     redis://127.0.0.1:$REDIS_PORT/0  (cxone.rate_limit.redis_url)
S3        http://$S3_HOST:$S3_PORT  bucket $S3_BUCKET  (moto: any access key)
S3        http://$S3_HOST:$S3S_PORT  bucket $S3_BUCKET  (s3s-fs: AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test)
export OFFBOARD__S3__ENDPOINT=http://$S3_HOST:$S3_PORT AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test
OUT
}

cmd_down() {
  if [ -f "$STATE/s3s-fs.pid" ]; then
    kill "$(cat "$STATE/s3s-fs.pid")" 2>/dev/null || true
    rm -f "$STATE/s3s-fs.pid"
    log "s3s-fs stopped"
  fi
  if [ -f "$STATE/redis.started-by-us" ]; then
    redis-cli -h 127.0.0.1 -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
    rm -f "$STATE/redis.started-by-us"
    log "redis stopped"
  fi
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
  if redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG; then echo "redis     up    127.0.0.1:$REDIS_PORT"; else echo "redis     down"; rc=1; fi
  if s3_running; then echo "moto      up    http://$S3_HOST:$S3_PORT"; else echo "moto      down"; rc=1; fi
  if s3s_running; then echo "s3s-fs    up    http://$S3_HOST:$S3S_PORT"; else echo "s3s-fs    down"; rc=1; fi
  return $rc
}

case "${1:-}" in
  up) shift; cmd_up "$@" ;;
  down) cmd_down ;;
  status) cmd_status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
