"""Tests of the Helm chart helm/cxone-offboard, by rendering it with the real helm binary.

Run by `make helm-lint` (scripts/helm-lint.sh), which installs helm into .tools/bin and the
Python tools. Alone: `HELM=.tools/bin/helm python3 -m pytest tests/helm`.

What is checked, for every values file in helm/values-tests/:
- no container runs as root; read-only root FS, no privilege escalation, all capabilities
  dropped, seccomp RuntimeDefault;
- terminationGracePeriodSeconds exceeds worker.shutdown_grace_secs of the rendered config;
- secrets are never inlined in the ConfigMap, and reach the worker only from the Secret;
- the rendered config.toml parses and uses only keys config/default.toml knows, and (when a
  built binary is at hand; this never builds one) `cxone-offboard check` accepts it;
- the KEDA ScaledObject targets the Deployment and both stages' queues (offboard.requests,
  offboard.housekeeping), with queue lengths = the in-flight limits and auth from the same
  Secret key as the AMQP URL (KEDA and Prometheus-operator objects are not in
  kubernetes-validate's schemas);
- the optional secret keys (redis-url of the shared quota, amqp-control-key) reach the worker
  only from the Secret, and only when set (or optional, with existingSecret);
- the ServiceMonitor, PrometheusRule and Grafana dashboard ConfigMap are absent by default and,
  when enabled, carry files/alerts.yaml and files/dashboard.json with this release's job,
  namespace, queue names and runbook URL; every alert has a unit test and a runbook section.
And that bad values fail: a wrong type, a typo, a secret in `config`, missing secrets.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "cxone-offboard"
VALUES_DIR = ROOT / "helm" / "values-tests"
VALUES_FILES = sorted(VALUES_DIR.glob("*.yaml"))
HELM = os.environ.get("HELM") or str(ROOT / ".tools" / "bin" / "helm")
KUBE_VERSION = os.environ.get("KUBE_VERSION", "1.33") + ".0"
CONFIG_PATH = "/etc/cxone-offboard/config.toml"
REQUIRED_SECRETS = {
    "secrets": {
        "amqpUrl": "amqp://offboard:s3cr3t-broker-pw@rabbitmq:5672/%2f",
        "cxoneAccessKeyId": "key-id-123",
        "cxoneAccessKeySecret": "key-secret-456",
    }
}

if not Path(HELM).exists():
    pytest.skip(f"no helm at {HELM}: run scripts/helm-lint.sh", allow_module_level=True)


# --- rendering ---------------------------------------------------------------------------

def helm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([HELM, *args], capture_output=True, text=True, timeout=60)


def template_args(files: list[Path]) -> list[str]:
    args = ["template", "offboard", str(CHART), "--namespace", "offboard",
            "--kube-version", KUBE_VERSION]
    for f in files:
        args += ["-f", str(f)]
    return args


@functools.lru_cache(maxsize=None)
def render_file(path: Path) -> tuple[dict, ...]:
    proc = helm(*template_args([path]))
    assert proc.returncode == 0, proc.stderr
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)


def render(tmp_path: Path, *values: dict) -> list[dict]:
    proc = helm(*template_args(write_values(tmp_path, *values)))
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def render_fails(tmp_path: Path, *values: dict, lint: bool = False) -> str:
    """helm template (what install renders) fails; with lint=True `helm lint --strict` too.
    helm lint only reports schema errors: it logs the chart's `fail`/`required` and passes.
    Returns helm template's error text."""
    files = write_values(tmp_path, *values)
    proc = helm(*template_args(files))
    assert proc.returncode != 0, f"helm template accepted {values}:\n{proc.stdout[:2000]}"
    if not lint:
        return proc.stderr
    lint_args = ["lint", "--strict", str(CHART)]
    for f in files:
        lint_args += ["-f", str(f)]
    lint = helm(*lint_args)
    assert lint.returncode != 0, f"helm lint accepted {values}:\n{lint.stdout}"
    return proc.stderr


def write_values(tmp_path: Path, *values: dict) -> list[Path]:
    files = []
    for i, v in enumerate(values):
        f = tmp_path / f"values-{i}.yaml"
        f.write_text(yaml.safe_dump(v))
        files.append(f)
    return files


def by_kind(docs, kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs, kind: str) -> dict:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def worker_deployment(docs) -> dict:
    """The worker's Deployment (the intake, when enabled, has its own)."""
    found = [
        d for d in by_kind(docs, "Deployment")
        if d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") == "worker"
    ]
    assert len(found) == 1, f"expected one worker Deployment, found {len(found)}"
    return found[0]


def config_map(docs) -> dict:
    """The worker's ConfigMap (config.toml); the dashboard has its own."""
    found = [d for d in by_kind(docs, "ConfigMap") if "config.toml" in d.get("data", {})]
    assert len(found) == 1, f"expected one ConfigMap with config.toml, found {len(found)}"
    return found[0]


def rendered_config(docs) -> dict:
    return tomllib.loads(config_map(docs)["data"]["config.toml"])


def pod_specs(docs) -> list[tuple[str, dict]]:
    out = []
    for d in docs:
        if d["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
            out.append((f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"]))
        elif d["kind"] == "CronJob":
            out.append((f"CronJob/{d['metadata']['name']}",
                        d["spec"]["jobTemplate"]["spec"]["template"]["spec"]))
    return out


def worker_container(docs) -> dict:
    spec = worker_deployment(docs)["spec"]["template"]["spec"]
    return next(c for c in spec["containers"] if c["name"] == "worker")


def flatten(table: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in table.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


params = pytest.mark.parametrize("values_file", VALUES_FILES, ids=lambda p: p.stem)


def test_values_files_exist():
    names = {p.stem for p in VALUES_FILES}
    assert {"defaults", "keda-off", "existing-secret", "network-policy", "monitoring"} <= names


# --- security ------------------------------------------------------------------------------

@params
def test_no_container_runs_as_root(values_file):
    specs = pod_specs(render_file(values_file))
    assert specs, "no pod template rendered"
    for name, spec in specs:
        pod_sc = spec.get("securityContext") or {}
        for c in spec.get("initContainers", []) + spec["containers"]:
            sc = c.get("securityContext") or {}
            where = f"{name} container {c['name']}"
            run_as_user = sc.get("runAsUser", pod_sc.get("runAsUser"))
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, where
            assert isinstance(run_as_user, int) and run_as_user != 0, where
            assert sc.get("runAsGroup", pod_sc.get("runAsGroup", 1)) != 0, where
            assert sc.get("privileged", False) is False, where
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not sc.get("capabilities", {}).get("add"), where
            seccomp = sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}
            assert seccomp.get("type") == "RuntimeDefault", where


@params
def test_tmp_is_a_writable_empty_dir(values_file):
    for name, spec in pod_specs(render_file(values_file)):
        volumes = {v["name"]: v for v in spec["volumes"]}
        for c in spec["containers"]:
            mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
            assert "/tmp" in mounts, name
            assert "emptyDir" in volumes[mounts["/tmp"]["name"]], name
            assert mounts["/etc/cxone-offboard"]["readOnly"] is True, name


# --- drain ---------------------------------------------------------------------------------

@params
def test_grace_period_exceeds_shutdown_grace(values_file):
    docs = render_file(values_file)
    grace = rendered_config(docs)["worker"]["shutdown_grace_secs"]
    for name, spec in pod_specs(docs):
        if name.startswith("Deployment/"):
            assert spec["terminationGracePeriodSeconds"] > grace, name
            assert spec["terminationGracePeriodSeconds"] >= grace + 5, name


def test_grace_period_follows_worker_values(tmp_path):
    docs = render(tmp_path, REQUIRED_SECRETS,
                  {"worker": {"shutdownGraceSecs": 100, "terminationGraceMarginSecs": 20}})
    assert rendered_config(docs)["worker"]["shutdown_grace_secs"] == 100
    assert worker_deployment(docs)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 120


@params
def test_rolling_update_keeps_consumers(values_file):
    strategy = worker_deployment(render_file(values_file))["spec"]["strategy"]
    assert strategy["rollingUpdate"]["maxUnavailable"] == 0


# --- worker wiring -------------------------------------------------------------------------

@params
def test_worker_command_probes_and_port(values_file):
    docs = render_file(values_file)
    c = worker_container(docs)
    assert c["args"] == ["--config", CONFIG_PATH, "worker"]
    assert "command" not in c, "the image's ENTRYPOINT is the binary"
    listen = rendered_config(docs)["http"]["listen"]
    port = int(listen.rsplit(":", 1)[1])
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http-metrics": port}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http-metrics"}
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http-metrics"}
    assert c["resources"]["requests"] and c["resources"]["limits"]
    svc = next(s for s in by_kind(docs, "Service") if s["spec"]["ports"][0]["targetPort"] == "http-metrics")
    selector = svc["spec"]["selector"]
    pod_labels = worker_deployment(docs)["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= pod_labels.items()


@params
def test_config_toml_uses_known_keys(values_file):
    """The worker denies unknown keys: everything rendered must be a key it knows."""
    known = set(flatten(tomllib.loads((ROOT / "config" / "default.toml").read_text())))
    # Keys default.toml leaves commented out (unset by default).
    known |= {"s3.endpoint", "cxone.api_base_url", "cxone.auth_base_url", "cxone.scim_base_url",
              "cxone.access_key_secret_file", "cxone.rate_limit.redis_key",
              "cxone.rate_limit.redis_url_file", "amqp.control_key_file",
              "s3.object_lock_mode", "s3.object_lock_days"}
    rendered = flatten(rendered_config(render_file(values_file)))
    for key in rendered:
        generic = re.sub(r"^hris\.endpoints\.[a-z0-9_]+\.", "hris.endpoints.*.", key)
        if generic.startswith("hris.endpoints.*."):
            assert generic in {"hris.endpoints.*.url", "hris.endpoints.*.secret_file"}, key
        else:
            assert key in known, f"{key} is not in config/default.toml"


def worker_binary() -> Path | None:
    """A cxone-offboard binary already built (this test never builds one)."""
    if os.environ.get("CXONE_OFFBOARD_BIN"):
        return Path(os.environ["CXONE_OFFBOARD_BIN"])
    for profile in ("release", "debug"):
        candidate = ROOT / "target" / profile / "cxone-offboard"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


@params
def test_rendered_config_loads_in_the_worker(values_file, tmp_path):
    """The worker itself accepts the rendered config.toml plus the chart's environment
    (`check` prints its config line first). Every address points at a closed loopback port."""
    binary = worker_binary()
    if binary is None:
        pytest.skip("no built cxone-offboard binary (target/*/cxone-offboard or CXONE_OFFBOARD_BIN)")
    docs = render_file(values_file)
    config_file = tmp_path / "config.toml"
    config_file.write_text(config_map(docs)["data"]["config.toml"])
    env = {"PATH": "/usr/bin:/bin", "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "OFFBOARD__S3__ENDPOINT": "http://127.0.0.1:9",
           "OFFBOARD__CXONE__ISSUER": "http://127.0.0.1:9",
           "OFFBOARD__AMQP__RECONNECT_INITIAL_MS": "1", "OFFBOARD__AMQP__RECONNECT_MAX_MS": "1"}
    plausible = {"OFFBOARD__AMQP__URL": "amqp://u:p@127.0.0.1:9/%2f",
                 "OFFBOARD__CXONE__RATE_LIMIT__REDIS_URL": "redis://:p@127.0.0.1:9/0",
                 "OFFBOARD__AMQP__CONTROL_KEY": "a-control-key-of-32-characters!!"}
    for var in worker_container(docs)["env"]:
        if "valueFrom" in var:  # what the Secret would provide
            env[var["name"]] = plausible.get(var["name"], "test-value")
    proc = subprocess.run([str(binary), "--config", str(config_file), "check"], env=env,
                          capture_output=True, text=True, timeout=60)
    first = (proc.stdout + proc.stderr).strip().splitlines()[0]
    assert re.match(r"^config\s+ok\b", first), proc.stdout + proc.stderr


def test_chart_defaults_match_the_binary(tmp_path):
    """values.yaml's config repeats config/default.toml; a default changed on one side only
    would silently override the other."""
    binary = flatten(tomllib.loads((ROOT / "config" / "default.toml").read_text()))
    chart = flatten(rendered_config(render(tmp_path, REQUIRED_SECRETS)))
    chart_only_overrides = {"log.format"}  # JSON logs in the cluster, not "auto"
    for key, value in chart.items():
        if key in binary and key not in chart_only_overrides:
            assert value == binary[key], f"{key}: chart {value!r}, config/default.toml {binary[key]!r}"
    missing = sorted(k for k in binary if k not in chart and k != "amqp.url")
    assert not missing, f"config/default.toml keys not in values.yaml config: {missing}"


def test_max_in_flight_feeds_config_and_keda(tmp_path):
    docs = render(tmp_path, REQUIRED_SECRETS,
                  {"worker": {"maxInFlight": 7, "housekeepingMaxInFlight": 3}})
    assert rendered_config(docs)["worker"]["max_in_flight"] == 7
    assert rendered_config(docs)["worker"]["housekeeping_max_in_flight"] == 3
    requests, housekeeping = one(docs, "ScaledObject")["spec"]["triggers"]
    assert requests["metadata"]["value"] == "7"
    assert housekeeping["metadata"]["value"] == "3"


def test_config_changes_roll_the_pods(tmp_path):
    a = worker_deployment(render(tmp_path, REQUIRED_SECRETS))
    b = one(render(tmp_path, REQUIRED_SECRETS, {"config": {"s3": {"bucket": "other-bucket"}}}),
            "Deployment")
    key = "checksum/config"
    assert a["spec"]["template"]["metadata"]["annotations"][key] != \
        b["spec"]["template"]["metadata"]["annotations"][key]


# --- secrets -------------------------------------------------------------------------------

SECRET_ENV = {
    "OFFBOARD__AMQP__URL": "amqp-url",
    "OFFBOARD__CXONE__ACCESS_KEY_ID": "cxone-access-key-id",
    "OFFBOARD__CXONE__ACCESS_KEY_SECRET": "cxone-access-key-secret",
}
# Optional keys, and the value that puts each into the chart's Secret.
OPTIONAL_SECRET_ENV = {
    "OFFBOARD__CXONE__RATE_LIMIT__REDIS_URL": "redis-url",
    "OFFBOARD__AMQP__CONTROL_KEY": "amqp-control-key",
}
OPTIONAL_SECRET_VALUES = {
    "OFFBOARD__CXONE__RATE_LIMIT__REDIS_URL": ("quota", "redisUrl"),
    "OFFBOARD__AMQP__CONTROL_KEY": ("secrets", "amqpControlKey"),
}


def dig(values: dict, *path: str):
    for key in path:
        values = (values or {}).get(key)
    return values


def secret_name(docs) -> str:
    env = {e["name"]: e for e in worker_container(docs)["env"]}
    return env["OFFBOARD__AMQP__URL"]["valueFrom"]["secretKeyRef"]["name"]


@params
def test_secrets_never_inlined_in_configmap(values_file):
    docs = render_file(values_file)
    cm = config_map(docs)
    text = json.dumps(cm["data"])
    config = flatten(rendered_config(docs))
    for key, value in config.items():
        leaf = key.rsplit(".", 1)[-1]
        assert leaf not in {"url", "secret", "access_key_secret", "access_key_id", "password",
                            "token"} or key.startswith("hris.endpoints."), key
        assert not (key.startswith("hris.endpoints.") and leaf == "secret"), key
        if isinstance(value, str):
            assert not re.match(r"^[a-z][a-z0-9+.-]*://[^/@]*@", value), f"{key} carries credentials"
    assert "amqp" not in config or "url" not in rendered_config(docs)["amqp"]
    # No value of the chart-made Secret appears anywhere in the ConfigMap.
    for secret in by_kind(docs, "Secret"):
        for k, v in secret.get("data", {}).items():
            plain = base64.b64decode(v).decode()
            assert plain not in text, f"Secret key {k} is inlined in the ConfigMap"
        assert "stringData" not in secret


@params
def test_secrets_reach_the_worker_from_the_secret_only(values_file):
    docs = render_file(values_file)
    values = yaml.safe_load(values_file.read_text()) or {}
    name = secret_name(docs)
    assert name == (values.get("existingSecret") or "offboard-cxone-offboard")
    endpoints = rendered_config(docs).get("hris", {}).get("endpoints", {})
    expected = dict(SECRET_ENV)
    expected.update({f"OFFBOARD__HRIS__ENDPOINTS__{n.upper()}__SECRET": f"hris-{n}-secret"
                     for n in endpoints})
    # Optional keys: in the chart's Secret when set; with existingSecret, read when present.
    existing = bool(values.get("existingSecret"))
    optional = {var: key for var, key in OPTIONAL_SECRET_ENV.items()
                if existing or dig(values, *OPTIONAL_SECRET_VALUES[var])}
    for _, spec in pod_specs(docs):
        for c in spec["containers"]:
            if c["name"] == "intake":
                continue  # test_intake_deployment_service_hpa_and_ingress
            env = {e["name"]: e for e in c["env"]}
            for var, key in expected.items():
                assert "value" not in env[var], f"{var} inlined"
                assert env[var]["valueFrom"]["secretKeyRef"] == {"name": name, "key": key}
            for var, key in OPTIONAL_SECRET_ENV.items():
                if var not in optional:
                    assert var not in env, f"{var} set although {key} is not"
                    continue
                assert "value" not in env[var], f"{var} inlined"
                ref = {"name": name, "key": key}
                if existing:
                    ref["optional"] = True
                assert env[var]["valueFrom"]["secretKeyRef"] == ref
            assert "envFrom" not in c
    expected.update({} if existing else optional)
    if (values.get("intake") or {}).get("enabled"):
        expected.update({n: f"intake-{n}-secret" for n in values["intake"]["sources"]})
    secrets = by_kind(docs, "Secret")
    if values.get("existingSecret"):
        assert secrets == [], "existingSecret set, yet the chart rendered a Secret"
    else:
        assert set(one(docs, "Secret")["data"]) == set(expected.values())


def test_secret_values_are_encoded(tmp_path):
    docs = render(tmp_path, REQUIRED_SECRETS)
    data = one(docs, "Secret")["data"]
    assert base64.b64decode(data["amqp-url"]).decode() == REQUIRED_SECRETS["secrets"]["amqpUrl"]
    assert base64.b64decode(data["cxone-access-key-secret"]).decode() == "key-secret-456"


def test_irsa_annotation_on_service_account():
    docs = render_file(VALUES_DIR / "existing-secret.yaml")
    sa = one(docs, "ServiceAccount")
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    spec = worker_deployment(docs)["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == sa["metadata"]["name"]


# --- scaling -------------------------------------------------------------------------------

@params
def test_keda_scaled_object(values_file):
    docs = render_file(values_file)
    values = yaml.safe_load(values_file.read_text()) or {}
    keda_on = values.get("keda", {}).get("enabled", True)
    deployment = worker_deployment(docs)
    if not keda_on:
        assert not by_kind(docs, "ScaledObject") and not by_kind(docs, "TriggerAuthentication")
        return
    so = one(docs, "ScaledObject")
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    assert so["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                            "name": deployment["metadata"]["name"]}
    assert 0 <= so["spec"]["minReplicaCount"] <= so["spec"]["maxReplicaCount"]
    assert so["spec"]["cooldownPeriod"] >= 0 and so["spec"]["pollingInterval"] > 0
    assert "replicas" not in deployment["spec"], "KEDA owns the replica count"
    config = rendered_config(docs)
    # One trigger per stage: the HPA takes the larger replica count of the two.
    requests, housekeeping = so["spec"]["triggers"]
    assert requests["metadata"]["queueName"] == config["amqp"]["requests_queue"]
    assert housekeeping["metadata"]["queueName"] == config["amqp"]["housekeeping_queue"]
    assert requests["metadata"]["value"] == str(config["worker"]["max_in_flight"])
    assert housekeeping["metadata"]["value"] == str(config["worker"]["housekeeping_max_in_flight"])
    assert {requests["name"], housekeeping["name"]} == {"access-removal", "housekeeping"}
    ta = one(docs, "TriggerAuthentication")
    assert ta["apiVersion"] == "keda.sh/v1alpha1"
    for trigger in (requests, housekeeping):
        assert trigger["type"] == "rabbitmq"
        assert trigger["metadata"]["mode"] == "QueueLength"
        assert trigger["metadata"]["protocol"] == "amqp", "host is the worker's AMQP URL"
        assert all(isinstance(v, str) for v in trigger["metadata"].values()), \
            "KEDA metadata are strings"
        assert trigger["authenticationRef"] == {"name": ta["metadata"]["name"]}
    [ref] = ta["spec"]["secretTargetRef"]
    env = {e["name"]: e for e in worker_container(docs)["env"]}
    amqp_ref = env["OFFBOARD__AMQP__URL"]["valueFrom"]["secretKeyRef"]
    assert ref == {"parameter": "host", "name": amqp_ref["name"], "key": amqp_ref["key"]}
    assert not [h for h in by_kind(docs, "HorizontalPodAutoscaler")
                if h["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]], \
        "KEDA makes the worker's HPA"


def test_keda_defaults_watch_the_contract_queues():
    requests, housekeeping = one(render_file(VALUES_DIR / "defaults.yaml"),
                                 "ScaledObject")["spec"]["triggers"]
    assert requests["metadata"]["queueName"] == "offboard.requests"
    assert housekeeping["metadata"]["queueName"] == "offboard.housekeeping"


def test_queue_name_follows_config(tmp_path):
    docs = render(tmp_path, REQUIRED_SECRETS,
                  {"config": {"amqp": {"requests_queue": "acme.offboard.requests",
                                       "housekeeping_queue": "acme.offboard.housekeeping"}}})
    requests, housekeeping = one(docs, "ScaledObject")["spec"]["triggers"]
    assert requests["metadata"]["queueName"] == "acme.offboard.requests"
    assert housekeeping["metadata"]["queueName"] == "acme.offboard.housekeeping"


def test_hpa_when_keda_is_off():
    docs = render_file(VALUES_DIR / "keda-off.yaml")
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == worker_deployment(docs)["metadata"]["name"]
    assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def test_fixed_replicas_without_autoscaling():
    docs = render_file(VALUES_DIR / "existing-secret.yaml")
    assert not by_kind(docs, "HorizontalPodAutoscaler") and not by_kind(docs, "ScaledObject")
    assert worker_deployment(docs)["spec"]["replicas"] == 3


@params
def test_pdb_selects_the_worker_pods(values_file):
    docs = render_file(values_file)
    pdb = one(docs, "PodDisruptionBudget")
    labels = worker_deployment(docs)["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # Replay Job pods are not worker pods.
    for name, spec in pod_specs(docs):
        if name.startswith("Job/"):
            job = next(d for d in by_kind(docs, "Job") if f"Job/{d['metadata']['name']}" == name)
            job_labels = job["spec"]["template"]["metadata"]["labels"]
            assert not pdb["spec"]["selector"]["matchLabels"].items() <= job_labels.items()


# --- optional objects ----------------------------------------------------------------------

def test_service_monitor():
    docs = render_file(VALUES_DIR / "existing-secret.yaml")
    sm = one(docs, "ServiceMonitor")
    svc = one(docs, "Service")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    [ep] = sm["spec"]["endpoints"]
    assert ep["port"] in {p["name"] for p in svc["spec"]["ports"]}
    assert ep["path"] == "/metrics"
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_network_policy():
    docs = render_file(VALUES_DIR / "network-policy.yaml")
    np = one(docs, "NetworkPolicy")
    assert set(np["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    ports = {(p["port"], p.get("protocol", "TCP"))
             for rule in np["spec"]["egress"] for p in rule.get("ports", [])}
    assert {(53, "UDP"), (53, "TCP"), (5672, "TCP"), (5671, "TCP"), (443, "TCP"),
            (9000, "TCP")} <= ports
    [ingress] = np["spec"]["ingress"]
    assert ingress["ports"] == [{"port": "http-metrics", "protocol": "TCP"}]
    labels = worker_deployment(docs)["spec"]["template"]["metadata"]["labels"]
    assert np["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert not by_kind(render_file(VALUES_DIR / "defaults.yaml"), "NetworkPolicy")


def test_replay_job():
    docs = render_file(VALUES_DIR / "network-policy.yaml")
    job = one(docs, "Job")
    spec = job["spec"]["template"]["spec"]
    [c] = spec["containers"]
    assert c["args"][:3] == ["--config", CONFIG_PATH, "replay"]
    assert c["args"][-1] == "--dry-run", "replay is a dry run unless replayJob.dryRun=false"
    assert "--class" in c["args"] and "exhausted" in c["args"]
    assert spec["restartPolicy"] == "Never"
    assert job["spec"]["backoffLimit"] == 0
    assert not by_kind(render_file(VALUES_DIR / "defaults.yaml"), "Job")


def test_replay_job_without_dry_run(tmp_path):
    docs = render(tmp_path, REQUIRED_SECRETS,
                  {"replayJob": {"enabled": True, "dryRun": False, "args": ["--class", "invalid"]}})
    args = one(docs, "Job")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args == ["--config", CONFIG_PATH, "replay", "--class", "invalid"]


# --- shared quota and control key ----------------------------------------------------------

def test_optional_secret_keys_absent_by_default():
    docs = render_file(VALUES_DIR / "defaults.yaml")
    env = {e["name"] for e in worker_container(docs)["env"]}
    assert not env & set(OPTIONAL_SECRET_ENV), "no Redis URL or control key unless set"
    assert not set(one(docs, "Secret")["data"]) & set(OPTIONAL_SECRET_ENV.values())
    limits = rendered_config(docs)["cxone"]["rate_limit"]
    assert "redis_key" not in limits and "redis_url" not in limits


def test_shared_quota_and_control_key_from_the_chart_secret():
    values = yaml.safe_load((VALUES_DIR / "monitoring.yaml").read_text())
    docs = render_file(VALUES_DIR / "monitoring.yaml")
    data = one(docs, "Secret")["data"]
    redis_url = values["quota"]["redisUrl"]
    assert base64.b64decode(data["redis-url"]).decode() == redis_url
    assert base64.b64decode(data["amqp-control-key"]).decode() == values["secrets"]["amqpControlKey"]
    env = {e["name"]: e for e in worker_container(docs)["env"]}
    assert env["OFFBOARD__CXONE__RATE_LIMIT__REDIS_URL"]["valueFrom"]["secretKeyRef"] == \
        {"name": "offboard-cxone-offboard", "key": "redis-url"}
    # The URL carries a password: never in the ConfigMap, which gets only the key prefix.
    text = config_map(docs)["data"]["config.toml"]
    assert "redis://" not in text and "example-redis-password" not in text
    assert rendered_config(docs)["cxone"]["rate_limit"]["redis_key"] == values["quota"]["redisKey"]
    # A Redis URL changes the pods' environment: they roll.
    annotations = worker_deployment(docs)["spec"]["template"]["metadata"]["annotations"]
    plain = worker_deployment(render_file(VALUES_DIR / "defaults.yaml"))
    assert annotations["checksum/secret"] != \
        plain["spec"]["template"]["metadata"]["annotations"]["checksum/secret"]


def test_existing_secret_offers_the_optional_keys():
    docs = render_file(VALUES_DIR / "existing-secret.yaml")
    env = {e["name"]: e for e in worker_container(docs)["env"]}
    for var, key in OPTIONAL_SECRET_ENV.items():
        assert env[var]["valueFrom"]["secretKeyRef"] == \
            {"name": "offboard-credentials", "key": key, "optional": True}


def test_redis_url_with_existing_secret_fails(tmp_path):
    err = render_fails(tmp_path, {"existingSecret": "mine", "quota": {"redisUrl": "redis://r:6379/0"}})
    assert "key redis-url" in err, err


def test_redis_egress_only_with_the_shared_quota():
    def redis_rule(docs):
        np = one(docs, "NetworkPolicy")
        return [r for r in np["spec"]["egress"]
                if {p["port"] for p in r.get("ports", [])} == {6379}]
    assert redis_rule(render_file(VALUES_DIR / "monitoring.yaml"))
    assert not redis_rule(render_file(VALUES_DIR / "network-policy.yaml"))


# --- monitoring: ServiceMonitor, PrometheusRule, Grafana dashboard -------------------------

ALERTS_FILE = CHART / "files" / "alerts.yaml"
DASHBOARD_FILE = CHART / "files" / "dashboard.json"
ALERTS_TEST = ROOT / "tests" / "prometheus" / "alerts_test.yaml"
OPERATIONS_MD = ROOT / "docs" / "operations.md"


def alert_rules(groups: list[dict]) -> dict[str, dict]:
    return {r["alert"]: r for g in groups for r in g["rules"] if "alert" in r}


def dashboard_of(docs) -> tuple[dict, dict]:
    cms = [d for d in by_kind(docs, "ConfigMap") if "cxone-offboard.json" in d.get("data", {})]
    assert len(cms) == 1, f"expected one dashboard ConfigMap, found {len(cms)}"
    return cms[0], json.loads(cms[0]["data"]["cxone-offboard.json"])


@pytest.mark.parametrize("values_file", [VALUES_DIR / "defaults.yaml", VALUES_DIR / "keda-off.yaml",
                                         VALUES_DIR / "network-policy.yaml"], ids=lambda p: p.stem)
def test_monitoring_objects_absent_by_default(values_file):
    docs = render_file(values_file)
    assert not by_kind(docs, "ServiceMonitor") and not by_kind(docs, "PrometheusRule")
    assert not [d for d in by_kind(docs, "ConfigMap") if "cxone-offboard.json" in d.get("data", {})]


def test_prometheus_rule_carries_the_alert_file():
    docs = render_file(VALUES_DIR / "monitoring.yaml")
    rule = one(docs, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    source = alert_rules(yaml.safe_load(ALERTS_FILE.read_text())["groups"])
    rendered = alert_rules(rule["spec"]["groups"])
    assert rendered.keys() == source.keys()
    service = one(docs, "Service")["metadata"]["name"]
    for name, r in rendered.items():
        expr = r["expr"]
        # The worker selector is the job and namespace the ServiceMonitor gives the series.
        assert 'job="cxone-offboard"' not in expr, name
        if "offboard_" in expr:
            assert f'job="{service}", namespace="offboard"' in expr, name
        # RabbitMQ selectors: this release's queue names, plus the configured vhost.
        for matcher in re.findall(r'queue=~?"[^"]*"[^}]*', expr):
            assert "acme.offboard." in matcher and 'vhost="offboard"' in matcher, (name, matcher)
        assert "offboard.requests" not in re.sub(r"acme\.offboard\.", "", expr), name
        assert r["labels"]["severity"] == source[name]["labels"]["severity"], name
        assert r["labels"]["team"] == "identity", name
        assert r["annotations"]["runbook_url"] == (
            "https://git.example.com/platform/cxone-offboard/-/blob/main/docs/operations.md#"
            + name.lower()), name
        assert r["annotations"]["summary"] and r["annotations"]["description"], name
        assert r.get("for", "0m") == source[name].get("for", "0m"), name


def test_prometheus_rule_default_selector(tmp_path):
    docs = render(tmp_path, REQUIRED_SECRETS, {"metrics": {"prometheusRule": {"enabled": True}}})
    rendered = alert_rules(one(docs, "PrometheusRule")["spec"]["groups"])
    expr = rendered["OffboardCxoneCircuitOpen"]["expr"]
    assert 'offboard_cxone_breaker_open{job="offboard-cxone-offboard", namespace="offboard"}' in expr
    assert 'queue="offboard.held"}' in rendered["OffboardGuardHoldingSagas"]["expr"]
    assert "https://github.com/acme/cxone-offboard/blob/main/docs/operations.md#" in \
        rendered["OffboardCxoneCircuitOpen"]["annotations"]["runbook_url"]
    docs = render(tmp_path, REQUIRED_SECRETS, {"metrics": {"prometheusRule": {
        "enabled": True, "selector": 'job="kubernetes-pods", app="offboard"'}}})
    expr = alert_rules(one(docs, "PrometheusRule")["spec"]["groups"])["OffboardCxoneCircuitOpen"]["expr"]
    assert 'offboard_cxone_breaker_open{job="kubernetes-pods", app="offboard"}' in expr


@pytest.mark.skipif(not shutil.which("promtool"), reason="no promtool (scripts/helm-lint.sh installs it)")
def test_rendered_rules_pass_promtool(tmp_path):
    rule = one(render_file(VALUES_DIR / "monitoring.yaml"), "PrometheusRule")
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rule["spec"]))
    proc = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_grafana_dashboard_configmap():
    docs = render_file(VALUES_DIR / "monitoring.yaml")
    cm, dashboard = dashboard_of(docs)
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "Offboarding"}
    assert cm["metadata"]["namespace"] == "offboard"
    assert dashboard["uid"] == "cxone-offboard"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["requests_queue"]["query"] == "acme.offboard.requests"
    assert variables["housekeeping_queue"]["query"] == "acme.offboard.housekeeping"
    assert variables["held_queue"]["query"] == "acme.offboard.held"
    assert variables["dead_queue"]["query"] == "acme.offboard.dead"
    assert variables["delay_queue_prefix"]["query"] == "acme.offboard.delay"
    # Apart from the queue variables, the rendered JSON is the file's.
    source = json.loads(DASHBOARD_FILE.read_text())
    assert len(dashboard["panels"]) == len(source["panels"])
    assert [p.get("targets") for p in dashboard["panels"]] == [p.get("targets") for p in source["panels"]]


def test_grafana_dashboard_label_and_namespace(tmp_path):
    docs = render(tmp_path, REQUIRED_SECRETS, {"metrics": {"grafanaDashboard": {
        "enabled": True, "label": "grafana.example.com/dashboard", "labelValue": "offboarding",
        "namespace": "monitoring"}}})
    cm, dashboard = dashboard_of(docs)
    assert cm["metadata"]["labels"]["grafana.example.com/dashboard"] == "offboarding"
    assert "grafana_dashboard" not in cm["metadata"]["labels"]
    assert cm["metadata"]["namespace"] == "monitoring"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["requests_queue"]["query"] == "offboard.requests"


def test_dashboard_json_shape():
    """What Grafana needs to import it anywhere: one data-source variable, every query through
    it, panels inside the 24-column grid without overlap, unique ids, known variables only."""
    d = json.loads(DASHBOARD_FILE.read_text())
    assert d["schemaVersion"] >= 39 and d["uid"] and d["title"]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    known = set(variables) | {"__rate_interval", "__range", "__interval"}
    ids, cells = set(), {}
    for p in d["panels"]:
        assert p["id"] not in ids, f"duplicate panel id {p['id']}"
        ids.add(p["id"])
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f'{p["title"]} overlaps {cells[(x, y)]}'
                cells[(x, y)] = p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p.get("description"), f'{p["title"]}: say what the panel shows'
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}", p["title"]
            for var in re.findall(r"\$\{?(\w+)", t["expr"]):
                assert var in known, f'{p["title"]}: unknown variable ${var}'
            # Worker series are filtered by the deployment's namespace and job.
            for metric in re.findall(r"\b(offboard_\w+)\{([^}]*)\}", t["expr"]):
                assert 'namespace=~"$namespace"' in metric[1] and 'job=~"$job"' in metric[1], \
                    (p["title"], metric)
            assert not re.search(r"\boffboard_\w+(?![\w{])", t["expr"]), \
                f'{p["title"]}: a worker metric without the namespace/job selector'


def test_every_alert_has_a_unit_test_and_a_runbook():
    alerts = alert_rules(yaml.safe_load(ALERTS_FILE.read_text())["groups"])
    tests = yaml.safe_load(ALERTS_TEST.read_text())
    fired = {t["alertname"] for case in tests["tests"] for t in case.get("alert_rule_test", [])
             if t.get("exp_alerts")}
    quiet = {t["alertname"] for case in tests["tests"] for t in case.get("alert_rule_test", [])
             if not t.get("exp_alerts")}
    docs = OPERATIONS_MD.read_text()
    assert "\n## Alerts\n" in docs
    section = docs.split("\n## Alerts\n", 1)[1]
    headings = re.findall(r"^### (\w+)$", section, re.M)
    for name, rule in alerts.items():
        assert name in fired, f"{name}: no unit test where it fires"
        assert name in quiet, f"{name}: no unit test where it stays quiet"
        assert name in headings, f"{name}: no '### {name}' runbook under '## Alerts'"
        assert rule["annotations"]["runbook_url"].endswith("docs/operations.md#" + name.lower())
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
    assert set(headings) <= set(alerts), "a runbook for an alert that does not exist"


# --- values that must fail -----------------------------------------------------------------

@pytest.mark.parametrize("bad", [
    {"worker": {"maxInFlight": "lots"}},
    {"worker": {"shutdownGraceSecs": 25.5}},
    {"keda": {"enabled": "yes"}},
    {"keda": {"maxReplicaCount": 0}},
    {"config": {"amqp": {"prefetch": "32"}}},
    {"config": {"cxone": {"rate_limit": {"requests_per_second": -1}}}},
    {"config": {"cxone": {"block_login": "ldap"}}},
    {"image": {"pullPolicy": "Sometimes"}},
    {"networkPolicy": {"amqpPorts": [70000]}},
    {"worker": {"housekeepingMaxInFlight": 0}},
    {"quota": {"redisUrl": "http://redis:6379"}},
    {"secrets": {"amqpControlKey": "too-short"}},
    {"metrics": {"prometheusRule": {"enabled": "yes"}}},
    {"metrics": {"grafanaDashboard": {"labelValue": 1}}},
    {"config": {"cxone": {"rate_limit": {"redis_timeout_ms": 5}}}},
    {"config": {"sla": {"revoke_within_secs": 0}}},
], ids=lambda v: json.dumps(v))
def test_wrong_type_fails_the_schema(tmp_path, bad):
    err = render_fails(tmp_path, REQUIRED_SECRETS, bad, lint=True)
    assert "schema" in err, err


@pytest.mark.parametrize("bad", [
    {"kedaa": {"enabled": False}},
    {"config": {"amqp": {"prefech": 64}}},
    {"config": {"s3s": {"bucket": "x"}}},
    {"serviceAccount": {"annotation": {}}},
    {"metrics": {"serviceMonitors": {"enabled": True}}},
    {"quota": {"redisURL": "redis://r:6379/0"}},
], ids=lambda v: json.dumps(v))
def test_typo_fails_the_schema(tmp_path, bad):
    err = render_fails(tmp_path, REQUIRED_SECRETS, bad, lint=True)
    assert "schema" in err, err


@pytest.mark.parametrize("bad, message", [
    ({"config": {"cxone": {"access_key_secret": "x"}}}, "looks like a secret"),
    ({"config": {"cxone": {"access_key_id": "x"}}}, "looks like a secret"),
    ({"config": {"cxone": {"client_secret": "x"}}}, "looks like a secret"),
    ({"config": {"amqp": {"url": "amqp://rabbitmq:5672/%2f"}}}, "config.amqp.url is a secret"),
    ({"config": {"s3": {"endpoint": "https://admin:pw@minio:9000"}}}, "carries credentials"),
    ({"config": {"hris": {"endpoints": {"workday": {
        "url": "https://hr.example.com/hook", "secret": "x"}}}}}, "looks like a secret"),
    ({"config": {"worker": {"max_in_flight": 8}}}, "worker.maxInFlight"),
    ({"config": {"worker": {"housekeeping_max_in_flight": 8}}}, "worker.housekeepingMaxInFlight"),
    ({"config": {"cxone": {"rate_limit": {"redis_url": "redis://redis:6379/0"}}}}, "quota.redisUrl"),
    ({"config": {"cxone": {"rate_limit": {"redis_key": "k"}}}}, "quota.redisKey"),
    ({"config": {"amqp": {"control_key": "0123456789abcdef0123"}}}, "secrets.amqpControlKey"),
    ({"serviceMonitor": {"enabled": True}}, "moved to metrics.serviceMonitor"),
], ids=lambda v: json.dumps(v) if isinstance(v, dict) else v)
def test_secrets_in_config_are_refused(tmp_path, bad, message):
    err = render_fails(tmp_path, REQUIRED_SECRETS, bad)
    assert message in err, err


def test_missing_secrets_fail(tmp_path):
    err = render_fails(tmp_path, {})
    assert "secrets.amqpUrl is required" in err, err


def test_existing_secret_excludes_inline_secrets(tmp_path):
    err = render_fails(tmp_path, REQUIRED_SECRETS, {"existingSecret": "mine"})
    assert "leave `secrets` empty" in err, err


def test_hris_endpoint_and_secret_go_together(tmp_path):
    err = render_fails(tmp_path, REQUIRED_SECRETS,
                       {"config": {"hris": {"endpoints": {"workday": {"url": "https://h.example/x"}}}}})
    assert "secrets.hrisSecrets.workday is required" in err, err
    err = render_fails(tmp_path, REQUIRED_SECRETS, {"secrets": {"hrisSecrets": {"workday": "s"}}})
    assert "no config.hris.endpoints.workday" in err, err


def test_hris_endpoint_names_are_env_safe(tmp_path):
    render_fails(tmp_path, REQUIRED_SECRETS, {
        "config": {"hris": {"endpoints": {"Work-Day": {"url": "https://h.example/x"}}}}})


# --- image ---------------------------------------------------------------------------------

def test_dockerfile_shape():
    text = (ROOT / "Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert len(froms) >= 2, "multi-stage build"
    assert re.search(r"cargo build --release --locked", text)
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in {"0", "root"}
    assert users[-1].split(":")[0] == "10001", "the chart's runAsUser"
    assert 'ENTRYPOINT ["/usr/local/bin/cxone-offboard"]' in text
    assert re.search(r'^CMD \["worker"\]', text, re.M)
    assert re.search(r"^EXPOSE 9090", text, re.M)
    for label in ("title", "source", "version", "licenses"):
        assert f"org.opencontainers.image.{label}" in text, label
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert "target" in ignore or "/target" in ignore


def test_rate_limit_from_set_is_a_number(tmp_path):
    """`helm --set ...requests_per_second=2.5` passes a string; the worker gets a number."""
    docs = render(tmp_path, REQUIRED_SECRETS,
                  {"config": {"cxone": {"rate_limit": {"requests_per_second": "2.5"}}}})
    assert rendered_config(docs)["cxone"]["rate_limit"]["requests_per_second"] == 2.5


# --- HTTP intake -------------------------------------------------------------------------

def test_intake_absent_by_default():
    docs = render_file(VALUES_DIR / "defaults.yaml")
    assert not [d for d in docs if d["metadata"]["name"].endswith("-intake")]
    assert not by_kind(docs, "Ingress")


def test_intake_deployment_service_hpa_and_ingress():
    docs = render_file(VALUES_DIR / "intake.yaml")
    deployments = {d["metadata"]["name"]: d for d in by_kind(docs, "Deployment")}
    intake = deployments["offboard-cxone-offboard-intake"]
    pod = intake["spec"]["template"]
    assert pod["metadata"]["labels"]["app.kubernetes.io/component"] == "intake"
    (c,) = pod["spec"]["containers"]
    assert c["args"][-3:] == ["intake", "--listen", "0.0.0.0:8080"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    env = {e["name"]: e for e in c["env"]}
    # Only the broker URL and the source secrets: the intake never talks to CXone or S3.
    assert env["OFFBOARD__AMQP__URL"]["valueFrom"]["secretKeyRef"]["key"] == "amqp-url"
    for name in ("WORKDAY", "BAMBOO_HR"):
        ref = env[f"OFFBOARD__INTAKE__SOURCES__{name}__SECRET"]["valueFrom"]["secretKeyRef"]
        assert ref["key"] == f"intake-{name.lower()}-secret"
    assert env["OFFBOARD__INTAKE__SOURCES__WORKDAY__REQUESTS_PER_SECOND"]["value"] == "20"
    assert not [k for k in env if "CXONE" in k]
    secret = one(docs, "Secret")
    assert base64.b64decode(secret["data"]["intake-workday-secret"]).decode().startswith("whsec_")
    # Scales on CPU, not on the queue.
    hpas = {h["spec"]["scaleTargetRef"]["name"]: h for h in by_kind(docs, "HorizontalPodAutoscaler")}
    assert hpas["offboard-cxone-offboard-intake"]["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    services = {s["metadata"]["name"]: s for s in by_kind(docs, "Service")}
    svc = services["offboard-cxone-offboard-intake"]
    assert svc["spec"]["selector"]["app.kubernetes.io/component"] == "intake"
    ingress = one(docs, "Ingress")
    (rule,) = ingress["spec"]["rules"]
    (path,) = rule["http"]["paths"]
    assert rule["host"] == "hr-intake.example.com"
    assert path["path"] == "/v1/sources" and path["backend"]["service"]["name"] == svc["metadata"]["name"]
    # The worker's own Service and PDB do not select intake pods.
    worker_svc = services["offboard-cxone-offboard"]
    assert worker_svc["spec"]["selector"]["app.kubernetes.io/component"] == "worker"
    policy = one(docs, "NetworkPolicy")
    ports = [p["port"] for rule in policy["spec"]["ingress"] for p in rule.get("ports", [])]
    assert "http-intake" in ports


def test_intake_source_without_secret_fails(tmp_path):
    err = render_fails(tmp_path, REQUIRED_SECRETS, {"intake": {"enabled": True, "sources": {"workday": {}}}})
    assert "secrets.intakeSecrets.workday" in err


def test_intake_secret_without_source_fails(tmp_path):
    err = render_fails(tmp_path, REQUIRED_SECRETS, {
        "intake": {"enabled": True, "sources": {"workday": {}}},
        "secrets": {"intakeSecrets": {"workday": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
                                      "rippling": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}},
    })
    assert "intake.sources.rippling" in err


def test_intake_without_sources_fails(tmp_path):
    err = render_fails(tmp_path, REQUIRED_SECRETS, {"intake": {"enabled": True}})
    assert "intake.sources" in err


# --- reconcile CronJob -------------------------------------------------------------------

def test_reconcile_cronjob_absent_by_default():
    assert not by_kind(render_file(VALUES_DIR / "defaults.yaml"), "CronJob")


def test_reconcile_cronjob_from_a_configmap():
    docs = render_file(VALUES_DIR / "network-policy.yaml")
    cron = one(docs, "CronJob")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["args"] == ["--config", CONFIG_PATH, "reconcile", "--roster",
                         "/etc/cxone-offboard-roster/roster.csv", "--json", "--publish"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["roster"]["configMap"]["name"] == "hr-roster"
    assert any(m["mountPath"] == "/etc/cxone-offboard-roster" for m in c["volumeMounts"])


def test_reconcile_cronjob_from_s3(tmp_path):
    docs = render(tmp_path, REQUIRED_SECRETS, {"reconcileJob": {
        "enabled": True, "rosterUri": "s3://hr-exports/active.csv", "timeZone": "Europe/Berlin"}})
    cron = one(docs, "CronJob")
    assert cron["spec"]["timeZone"] == "Europe/Berlin"
    (c,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert c["args"][-3:] == ["--roster", "s3://hr-exports/active.csv", "--json"]
    assert "--publish" not in c["args"]


def test_reconcile_cronjob_needs_a_roster(tmp_path):
    err = render_fails(tmp_path, REQUIRED_SECRETS, {"reconcileJob": {"enabled": True}})
    assert "reconcileJob.rosterUri" in err
