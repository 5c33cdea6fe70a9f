#!/usr/bin/env python3
"""A real Prometheus against a real worker: every dashboard query and every alert expression
must find its series (issue 21). Run by scripts/prometheus-check.sh, which installs what is
missing and starts the services; alone:

    OFFBOARD_BIN=target/debug/cxone-offboard python3 tests/prometheus/live_check.py [--keep]

What it does, all on loopback with names of its own (nothing shared with other runs):
1. starts the CXone simulator (rate-limited, so 429s happen) and one worker on a fresh bucket,
   queues prefixed with a random run id, the shared quota in Redis under a key of its own (when
   Redis answers on 127.0.0.1:6379), the mass-deletion guard at 45 per window;
2. starts Prometheus (own port and data directory, scrape and rule evaluation every second)
   scraping the worker's /metrics and RabbitMQ's /metrics/detailed (rabbitmq_prometheus), with
   the chart's alert rules (files/alerts.yaml, queue names of this run) loaded;
3. publishes a demo-sized batch: 50 terminations, 3 of them dated 5 hours back (SLA breached),
   one that CXone refuses (permanent) and one whose archive keeps failing (exhausted), so 5 are
   held by the guard, plus 2 invalid events;
4. when the work has settled, evaluates through /api/v1/query every panel target and template
   variable of files/dashboard.json ($__rate_interval, $__range, $namespace, $job, $vhost and
   the queue variables substituted) and every alert expression. A query must return data; one
   that filters (a comparison, and/unless, absent) and is empty in this healthy run passes only
   if every series selector inside it finds series, so a misspelt metric or label never passes.
   It also checks the rules evaluate without error, the provoked alerts are pending or firing,
   and both scrape targets are up;
5. stops everything it started and deletes its queues, exchanges, bucket and Redis keys.
Exit 0 when everything returned data; 1 with the list of what did not.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART_FILES = ROOT / "helm" / "cxone-offboard" / "files"
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2f"
S3_ENDPOINT = os.environ.get("OFFBOARD_CHECK_S3", "http://127.0.0.1:9000")
RABBIT_METRICS = "127.0.0.1:15692"
REDIS = ("127.0.0.1", 6379)
JOB = "cxone-offboard"  # the scrape job of the worker, as files/alerts.yaml selects it
USERS = 50
GUARD = 45
# Grafana's built-in variables, as Grafana would set them for a 5-minute view scraped every 1 s.
GRAFANA_BUILTINS = {"__rate_interval": "1m", "__range": "5m", "__interval": "15s"}


def log(msg: str) -> None:
    print(f"[prometheus-check] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def get(url: str, timeout: float = 5) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def wait_until(what: str, check, timeout: float, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 - any failure means "not yet"
            last_error = e
        time.sleep(interval)
    raise SystemExit(f"timed out after {timeout:.0f}s waiting for {what}"
                     + (f" (last error: {last_error})" if last_error else ""))


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text: 'name{labels}' -> value (comments skipped)."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        try:
            out[key] = float(value)
        except ValueError:
            pass
    return out


def total(metrics: dict[str, float], name: str, **labels: str) -> float:
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(v for k, v in metrics.items()
               if (k == name or k.startswith(name + "{")) and all(w in k for w in want))


# --- PromQL: the series selectors inside an expression ----------------------------------------

LABEL_LIST_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
                "bottomk", "topk", "quantile"}
KEYWORDS = LABEL_LIST_KEYWORDS | AGGREGATIONS | {"and", "or", "unless", "bool", "offset", "atan2",
                                                 "inf", "nan"}
FILTERING = re.compile(r"(==|!=|>=|<=|(?<![=!<>])[<>](?!=)|\band\b|\bunless\b|\babsent\(|\btopk\(|\bbottomk\()")


def _skip_string(expr: str, i: int) -> int:
    quote, j = expr[i], i + 1
    while j < len(expr) and expr[j] != quote:
        j += 2 if expr[j] == "\\" else 1
    return j + 1


def _matching(expr: str, i: int, open_: str, close: str) -> int:
    depth, j = 0, i
    while j < len(expr):
        c = expr[j]
        if c in "\"'`":
            j = _skip_string(expr, j)
            continue
        if c == open_:
            depth += 1
        elif c == close:
            depth -= 1
            if depth == 0:
                return j
        j += 1
    raise ValueError(f"unbalanced {open_} in {expr!r}")


def selectors(expr: str) -> list[str]:
    """The instant-vector selectors (metric name and matchers) an expression reads."""
    out, i, n = [], 0, len(expr)
    while i < n:
        c = expr[i]
        if c in "\"'`":
            i = _skip_string(expr, i)
        elif c == "[":
            i = _matching(expr, i, "[", "]") + 1
        elif c == "{":
            j = _matching(expr, i, "{", "}")
            out.append(expr[i:j + 1])
            i = j + 1
        elif c.isdigit() or (c == "." and i + 1 < n and expr[i + 1].isdigit()):
            m = re.match(r"[0-9.]+(?:[eE][+-]?[0-9]+)?", expr[i:])
            i += len(m.group(0))
        elif re.match(r"[A-Za-z_:]", c):
            word = re.match(r"[A-Za-z_:][A-Za-z0-9_:]*", expr[i:]).group(0)
            j = i + len(word)
            k = j
            while k < n and expr[k].isspace():
                k += 1
            if word.lower() in LABEL_LIST_KEYWORDS and k < n and expr[k] == "(":
                i = _matching(expr, k, "(", ")") + 1
            elif word.lower() in KEYWORDS or (k < n and expr[k] == "("):
                i = j  # an operator or a function name
            else:
                if k < n and expr[k] == "{":
                    j = _matching(expr, k, "{", "}") + 1
                out.append(expr[i:j])
                i = j
        else:
            i += 1
    return out


# --- the run ----------------------------------------------------------------------------------

class Names:
    """Broker names of this run (what tests/it/helpers.rs Names does for the Rust tests)."""

    def __init__(self) -> None:
        self.run = uuid.uuid4().hex[:10]
        self.prefix = f"pc{self.run}."
        p = self.prefix
        self.events = f"{p}hr.events"
        self.requests = f"{p}offboard.requests"
        self.housekeeping = f"{p}offboard.housekeeping"
        self.held = f"{p}offboard.held"
        self.dead = f"{p}offboard.dead"
        self.dlx = f"{p}offboard.dlx"
        self.outcomes = f"{p}offboard.outcomes"
        self.delay = f"{p}offboard.delay"
        self.bucket = f"prom-check-{self.run}"
        self.redis_key = f"offboard-prometheus-check-{self.run}"

    def substitute(self, text: str) -> str:
        """Default queue names of the chart's files -> this run's (as the chart does)."""
        pairs = [("offboard.requests", self.requests), ("offboard.housekeeping", self.housekeeping),
                 ("offboard.held", self.held), ("offboard.dead", self.dead),
                 ("offboard.delay", self.delay)]
        for i, (default, _) in enumerate(pairs):
            text = text.replace(default, f"@@NAME{i}@@")
        for i, (_, mine) in enumerate(pairs):
            text = text.replace(f"@@NAME{i}@@", mine)
        return text

    def worker_env(self, sim_url: str, http_port: int, redis: bool) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OFFBOARD__")}
        env.update({
            "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
            "OFFBOARD__AMQP__URL": AMQP_URL,
            "OFFBOARD__AMQP__EVENTS_EXCHANGE": self.events,
            "OFFBOARD__AMQP__REQUESTS_QUEUE": self.requests,
            "OFFBOARD__AMQP__HOUSEKEEPING_QUEUE": self.housekeeping,
            "OFFBOARD__AMQP__DEAD_LETTER_EXCHANGE": self.dlx,
            "OFFBOARD__AMQP__DEAD_QUEUE": self.dead,
            "OFFBOARD__AMQP__OUTCOMES_EXCHANGE": self.outcomes,
            "OFFBOARD__AMQP__HELD_QUEUE": self.held,
            "OFFBOARD__AMQP__DELAY_QUEUE_PREFIX": self.delay,
            "OFFBOARD__AMQP__RECONNECT_INITIAL_MS": "100",
            "OFFBOARD__AMQP__RECONNECT_MAX_MS": "1000",
            "OFFBOARD__S3__ENDPOINT": S3_ENDPOINT,
            "OFFBOARD__S3__BUCKET": self.bucket,
            "OFFBOARD__HTTP__LISTEN": f"127.0.0.1:{http_port}",
            "OFFBOARD__LOG__FORMAT": "json",
            "OFFBOARD__CXONE__ISSUER": sim_url,
            "OFFBOARD__CXONE__ACCESS_KEY_ID": "sim-key",
            "OFFBOARD__CXONE__ACCESS_KEY_SECRET": "sim-secret",
            # Above the simulator's limit (150/s): some 429s, as against a real tenant.
            "OFFBOARD__CXONE__RATE_LIMIT__REQUESTS_PER_SECOND": "300",
            "OFFBOARD__CXONE__RATE_LIMIT__BURST": "50",
            # A failing archive is exhausted in seconds, not hours.
            "OFFBOARD__CXONE__MAX_ATTEMPTS": "2",
            "OFFBOARD__CXONE__MAX_RETRY_ELAPSED_SECS": "2",
            "OFFBOARD__WORKER__RETRY_DELAYS_SECS": "1,2",
            # Few delay queues: every one is a quorum queue on the shared test broker.
            "OFFBOARD__WORKER__SCHEDULE_BUCKETS_SECS": "3600,60,10,1",
            "OFFBOARD__GUARD__MAX_DESTRUCTIVE_PER_WINDOW": str(GUARD),
        })
        if redis:
            env["OFFBOARD__CXONE__RATE_LIMIT__REDIS_URL"] = f"redis://{REDIS[0]}:{REDIS[1]}/0"
            env["OFFBOARD__CXONE__RATE_LIMIT__REDIS_KEY"] = self.redis_key
        return env


class Processes:
    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, args: list[str], log_path: Path, **kw) -> subprocess.Popen:
        f = open(log_path, "w")
        p = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True, **kw)
        self.procs.append((name, p))
        return p

    def stop_all(self) -> None:
        for name, p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for name, p in reversed(self.procs):
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                log(f"{name} ignored SIGTERM for 30 s: killing it")
                p.kill()
                p.wait()


def queue_depths(prefix: str) -> dict[str, float]:
    text = get(f"http://{RABBIT_METRICS}/metrics/detailed?family=queue_coarse_metrics")
    out = {}
    for line in text.splitlines():
        m = re.match(r'rabbitmq_detailed_queue_messages\{vhost="/",queue="([^"]+)"\} (\S+)', line)
        if m and m.group(1).startswith(prefix):
            out[m.group(1)] = float(m.group(2))
    return out


def delete_broker_objects(names: Names) -> None:
    import pika
    queues = set(queue_depths(names.prefix))
    conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        ch = conn.channel()
        for q in sorted(queues):
            ch.queue_delete(q)
        for x in (names.events, names.dlx, names.outcomes):
            ch.exchange_delete(x)
    finally:
        conn.close()
    log(f"deleted {len(queues)} queue(s) and 3 exchanges of run {names.run}")


def s3_client():
    import boto3
    return boto3.client("s3", endpoint_url=S3_ENDPOINT, region_name="us-east-1",
                        aws_access_key_id="test", aws_secret_access_key="test")


def delete_bucket(names: Names) -> None:
    s3 = s3_client()
    try:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=names.bucket):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                s3.delete_objects(Bucket=names.bucket, Delete={"Objects": keys})
        s3.delete_bucket(Bucket=names.bucket)
    except Exception as e:  # noqa: BLE001 - cleanup is best effort
        log(f"could not delete bucket {names.bucket}: {e}")


def delete_redis_keys(names: Names) -> None:
    if not shutil.which("redis-cli"):
        return
    keys = subprocess.run(["redis-cli", "-h", REDIS[0], "-p", str(REDIS[1]), "--scan",
                           "--pattern", f"*{names.redis_key}*"],
                          capture_output=True, text=True, timeout=20).stdout.split()
    if keys:
        subprocess.run(["redis-cli", "-h", REDIS[0], "-p", str(REDIS[1]), "del", *keys],
                       capture_output=True, timeout=20)


def publish_invalid(names: Names, count: int) -> None:
    """What a broken HRIS sends: not CloudEvents at all."""
    import pika
    conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        for i in range(count):
            ch.basic_publish(names.events, "employee.terminated",
                             json.dumps({"not": "a cloudevent", "n": i}).encode(),
                             pika.BasicProperties(content_type="application/json",
                                                  delivery_mode=2), mandatory=True)
    finally:
        conn.close()


def prometheus_config(work: Path, worker_port: int, rules: Path) -> Path:
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "900ms",
                   "evaluation_interval": "1s"},
        "rule_files": [str(rules)],
        "scrape_configs": [
            {"job_name": JOB, "static_configs": [{"targets": [f"127.0.0.1:{worker_port}"]}]},
            # RabbitMQ's own exporter, per-queue families only (what a ServiceMonitor on the
            # broker's /metrics/detailed endpoint scrapes; docs/deploying.md "Monitoring").
            {"job_name": "rabbitmq", "metrics_path": "/metrics/detailed",
             "params": {"family": ["queue_coarse_metrics", "queue_consumer_count"],
                        "vhost": ["/"]},
             "scrape_timeout": "900ms",
             "static_configs": [{"targets": [RABBIT_METRICS]}]},
        ],
    }
    path = work / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


class Prometheus:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def api(self, path: str, **params) -> dict:
        url = f"{self.base}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            body = get(url, timeout=10)
        except urllib.error.HTTPError as e:
            body = e.read().decode()
        return json.loads(body)

    def query(self, expr: str) -> tuple[list | None, str | None]:
        r = self.api("query", query=expr)
        if r.get("status") != "success":
            return None, f"{r.get('errorType')}: {r.get('error')}"
        return r["data"]["result"], None


def substitute_grafana(expr: str, names: Names) -> str:
    values = dict(GRAFANA_BUILTINS)
    values.update({"namespace": ".*", "job": JOB, "vhost": ".*",
                   "requests_queue": names.requests, "housekeeping_queue": names.housekeeping,
                   "held_queue": names.held, "dead_queue": names.dead,
                   "delay_queue_prefix": names.delay, "datasource": "prometheus"})

    def repl(m):
        name = m.group(1) or m.group(2)
        if name not in values:
            raise KeyError(f"unknown dashboard variable ${name} in {expr!r}")
        return values[name]
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", repl, expr)


def dashboard_queries(dashboard: dict) -> list[tuple[str, str]]:
    """(where, expr) for every panel target, annotation and query variable."""
    out = []
    for p in dashboard["panels"]:
        for t in p.get("targets", []):
            if t.get("expr"):
                out.append((f'panel "{p["title"]}" / {t.get("legendFormat", t["refId"])}',
                            t["expr"]))
    for a in dashboard["annotations"]["list"]:
        if a.get("expr"):
            out.append((f'annotation "{a["name"]}"', a["expr"]))
    for v in dashboard["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", q.strip())
            inner = m.group(1) if m else q
            out.append((f'variable ${v["name"]} ({q})', inner))
    return out


def check_expression(prom: Prometheus, where: str, expr: str) -> tuple[bool, str]:
    result, error = prom.query(expr)
    if error:
        return False, f"{where}: query error {error}\n      {expr}"
    if result:
        return True, f"{where}: {len(result)} series"
    if not FILTERING.search(expr):
        return False, f"{where}: no data\n      {expr}"
    missing = []
    for sel in selectors(expr):
        r, err = prom.query(f"count({sel})")
        if err or not r:
            missing.append(sel)
    if missing:
        return False, (f"{where}: no data, and these selectors find no series: "
                       + ", ".join(missing) + f"\n      {expr}")
    return True, f"{where}: empty (its condition is false in a healthy run); every selector finds series"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keep", action="store_true", help="keep the temp directory (logs)")
    ap.add_argument("--timeout", type=float, default=120, help="seconds for the batch to settle")
    args = ap.parse_args()

    binary = os.environ.get("OFFBOARD_BIN")
    if not binary:
        for profile in ("debug", "release"):
            candidate = ROOT / "target" / profile / "cxone-offboard"
            if candidate.is_file():
                binary = str(candidate)
                break
    if not binary or not Path(binary).is_file():
        log("no cxone-offboard binary: build one (cargo build) or set OFFBOARD_BIN")
        return 2
    prometheus_bin = shutil.which("prometheus")
    if not prometheus_bin:
        log("prometheus is not installed (scripts/prometheus-check.sh installs it)")
        return 2
    if not port_open("127.0.0.1", 15692):
        log("RabbitMQ's Prometheus endpoint 127.0.0.1:15692 is closed: "
            "rabbitmq-plugins enable rabbitmq_prometheus")
        return 2

    started = time.monotonic()
    names = Names()
    work = Path(tempfile.mkdtemp(prefix="offboard-prometheus-check-"))
    procs = Processes()
    redis = port_open(*REDIS)
    log(f"run {names.run}: binary {binary}, work dir {work}, shared quota in Redis: {redis}")
    checks: list[tuple[bool, str]] = []
    failures: list[str] = []
    try:
        # CXone simulator with a rate limit below the worker's: 429s happen.
        sim = procs.start("sim", [binary, "sim", "--listen", "127.0.0.1:0", "--users", str(USERS + 10),
                                  "--interactions-per-user", "3", "--rate-limit", "150",
                                  "--burst", "20"], work / "sim.log")
        sim_url = wait_until("the simulator", lambda: re.search(
            r"listening on (http://\S+)", (work / "sim.log").read_text()), 20).group(1)
        # Early in the batch, so the guard (which holds the last ones) admits them.
        faults = {"users": {"E000004": {"block_login": 403}, "E000005": {"archive": 503}}}
        req = urllib.request.Request(f"{sim_url}/_sim/faults", data=json.dumps(faults).encode(),
                                     headers={"content-type": "application/json"}, method="POST")
        urllib.request.urlopen(req, timeout=5).read()
        s3_client().create_bucket(Bucket=names.bucket)

        worker_port = free_port()
        procs.start("worker", [binary, "worker"], work / "worker.log",
                    env=names.worker_env(sim_url, worker_port, redis))
        worker = f"http://127.0.0.1:{worker_port}"
        wait_until("the worker to be ready", lambda: get(f"{worker}/readyz").startswith("ready"), 30)

        rules = work / "alerts.yaml"
        rules.write_text(names.substitute((CHART_FILES / "alerts.yaml").read_text()))
        prom_port = free_port()
        procs.start("prometheus", [
            prometheus_bin, f"--config.file={prometheus_config(work, worker_port, rules)}",
            f"--storage.tsdb.path={work / 'data'}", f"--web.listen-address=127.0.0.1:{prom_port}",
            "--storage.tsdb.retention.time=1h", "--log.level=warn"], work / "prometheus.log")
        prom = Prometheus(prom_port)
        wait_until("Prometheus to be ready", lambda: "Ready" in get(f"{prom.base}/-/ready"), 30)
        # The run starts from zeros Prometheus has seen, as on a real layoff day (increase()
        # cannot see what a counter did before its first sample).
        wait_until("the first scrape of the worker and RabbitMQ", lambda: all(
            prom.query(q)[0] for q in (f'offboard_sla_revocations_total{{job="{JOB}"}}',
                                       f'rabbitmq_detailed_queue_consumers{{queue="{names.requests}"}}')),
                   30)

        # The batch: 50 terminations (3 dated 5 h back: SLA breached), 2 invalid events.
        past = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=5)).strftime("%Y-%m-%dT%H:%M:%SZ")
        csv = work / "leavers.csv"
        csv.write_text("external_id,effective_at\n" + "".join(
            f"E{n:06d},{past if n <= 3 else ''}\n" for n in range(1, USERS + 1)))
        env = names.worker_env(sim_url, free_port(), redis)
        out = subprocess.run([binary, "publish", "--file", str(csv), "--format", "csv",
                              "--source", f"cxone-offboard://prometheus-check/{names.run}"],
                             env=env, capture_output=True, text=True, timeout=60)
        log((out.stdout + out.stderr).strip().splitlines()[-1] if (out.stdout + out.stderr).strip()
            else f"publish exited {out.returncode}")
        if out.returncode != 0:
            raise SystemExit(f"publish failed ({out.returncode}): {out.stderr}")
        publish_invalid(names, 2)

        state = {}

        def settled():
            m = parse_metrics(get(f"{worker}/metrics"))
            depths = queue_depths(names.prefix)
            busy = sum(v for q, v in depths.items() if q != names.dead and q != names.held)
            dead = {c: total(m, "offboard_messages_dead_lettered_total", **{"class": c})
                    for c in ("invalid", "permanent", "exhausted")}
            state.update(busy=busy, in_flight=total(m, "offboard_in_flight"), dead=dead,
                         held=depths.get(names.held, 0))
            done = (busy == 0 and state["in_flight"] == 0
                    and all(dead.values()) and state["held"] > 0)
            return (m, depths) if done else None

        try:
            metrics, depths = wait_until("the batch to settle (queues empty but held and dead, "
                                         "dead letters of each class)", settled, args.timeout, 1)
        except SystemExit as e:
            raise SystemExit(f"{e} - last seen: {state}") from None
        statuses = {k.split('status="')[1].split('"')[0]: v for k, v in metrics.items()
                    if k.startswith("offboard_sagas_total{")}
        log(f"settled after {time.monotonic() - started:.0f}s: sagas {statuses}, queues "
            + ", ".join(f"{q.removeprefix(names.prefix)}={v:.0f}" for q, v in sorted(depths.items())))
        # A few more scrapes, so every series has samples on both sides of the end of the run.
        time.sleep(4)

        checks: list[tuple[bool, str]] = []
        # Scrape targets.
        for t in prom.api("targets")["data"]["activeTargets"]:
            job = t["labels"].get("job")
            checks.append((t["health"] == "up",
                           f"scrape target {job}: {t['health']} {t.get('lastError') or ''}".strip()))
        # Dashboard.
        dashboard = json.loads(names.substitute((CHART_FILES / "dashboard.json").read_text()))
        for where, expr in dashboard_queries(dashboard):
            checks.append(check_expression(prom, where, substitute_grafana(expr, names)))
        # Alerts.
        rule_file = yaml.safe_load(rules.read_text())
        alerts = [r for g in rule_file["groups"] for r in g["rules"] if "alert" in r]
        for r in alerts:
            checks.append(check_expression(prom, f'alert {r["alert"]}', r["expr"].strip()))
        # The rules evaluate, and the alerts this run provoked are on their way.
        for g in prom.api("rules")["data"]["groups"]:
            for r in g["rules"]:
                checks.append((r.get("health") == "ok",
                               f'rule {r["name"]} evaluates: {r.get("health")} {r.get("lastError") or ""}'.strip()))
        active = {(a["labels"]["alertname"], a["state"]) for a in prom.api("alerts")["data"]["alerts"]}
        for expected in ("OffboardDeadLettersWritten", "OffboardRevocationSLABreached",
                         "OffboardGuardHoldingSagas"):
            states = sorted(s for n, s in active if n == expected)
            checks.append((bool(states), f"alert {expected} after this run: "
                                         + (", ".join(states) or "neither pending nor firing")))
        for ok, line in checks:
            print(("  ok    " if ok else "  FAIL  ") + line)
        print("  alerts now: " + (", ".join(f"{n} ({s})" for n, s in sorted(active)) or "none"))
        failures = [line for ok, line in checks if not ok]
    finally:
        procs.stop_all()
        try:
            delete_broker_objects(names)
        except Exception as e:  # noqa: BLE001
            log(f"could not delete the broker objects of run {names.run}: {e}")
        delete_bucket(names)
        delete_redis_keys(names)
        if args.keep:
            log(f"logs and Prometheus data kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    elapsed = time.monotonic() - started
    print(f"prometheus-check: {len(checks)} checks in {elapsed:.0f}s; every dashboard query and "
          "alert expression must find its series")
    if failures:
        print(f"\n{len(failures)} problem(s):")
        for f in failures:
            print("  - " + f)
    print(f"prometheus-check: {len(checks) - len(failures)} passed, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
