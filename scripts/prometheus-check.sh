#!/usr/bin/env bash
# A real Prometheus scraping a real worker during a demo-sized run (issue 21): every panel
# query of the Grafana dashboard and every alert expression of the chart
# (helm/cxone-offboard/files/{dashboard.json,alerts.yaml}) must find its series, the rules must
# evaluate, and the alerts the run provokes must fire. Details: tests/prometheus/live_check.py.
#
# Installs what is missing: prometheus/promtool (Debian package `prometheus`, its service not
# started: the worker's default port is 9090 too), the rabbitmq_prometheus plugin (enabled on
# the running broker, which is never restarted), pika/boto3/pyyaml. Needs RabbitMQ, moto on
# :9000 and, for the shared quota, Redis: `scripts/services.sh up` starts them (this script
# calls it for rabbitmq, redis and moto). Uses target/debug/cxone-offboard (or
# target/release/..., or $OFFBOARD_BIN) and never builds one. About a minute.
#
#   scripts/prometheus-check.sh [--keep]     --keep: leave logs and Prometheus data in /tmp
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

log() { printf '[prometheus-check] %s\n' "$*" >&2; }

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

ensure_prometheus() {
  if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
    return 0
  fi
  log "installing prometheus (apt)"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
  # policy-rc.d keeps the package's service from starting on :9090 where invoke-rc.d honours it.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  # Where a service manager did start it anyway, stop it: this script runs its own Prometheus.
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
    systemctl stop prometheus || true
  fi
}

ensure_rabbitmq_prometheus() {
  if port_open 127.0.0.1 15692; then
    return 0
  fi
  log "enabling the rabbitmq_prometheus plugin (no broker restart)"
  # Detached from this shell: rabbitmq-plugins talks to the running node over distribution.
  setsid -w rabbitmq-plugins enable rabbitmq_prometheus >"${TMPDIR:-/tmp}/offboard-rabbitmq-plugins.log" 2>&1 </dev/null \
    || { cat "${TMPDIR:-/tmp}/offboard-rabbitmq-plugins.log" >&2; log "could not enable rabbitmq_prometheus"; exit 1; }
  for _ in $(seq 30); do
    port_open 127.0.0.1 15692 && return 0
    sleep 1
  done
  log "RabbitMQ's Prometheus endpoint 127.0.0.1:15692 did not open"
  exit 1
}

ensure_python_modules() {
  local missing=() pkg mod
  for pkg in pika:pika boto3:boto3 pyyaml:yaml; do
    mod="${pkg#*:}"
    python3 -c "import $mod" 2>/dev/null || missing+=("${pkg%%:*}")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    log "pip install ${missing[*]}"
    python3 -m pip install -q --disable-pip-version-check "${missing[@]}"
  fi
}

scripts/services.sh up rabbitmq redis moto
ensure_prometheus
ensure_rabbitmq_prometheus
ensure_python_modules
exec python3 tests/prometheus/live_check.py "$@"
