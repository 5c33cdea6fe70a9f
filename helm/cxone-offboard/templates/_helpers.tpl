{{/* Names and labels. */}}
{{- define "cxone-offboard.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "cxone-offboard.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "cxone-offboard.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "cxone-offboard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cxone-offboard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Selects the worker pods only (not replay Job pods). */}}
{{- define "cxone-offboard.workerSelectorLabels" -}}
{{ include "cxone-offboard.selectorLabels" . }}
app.kubernetes.io/component: worker
{{- end }}

{{- define "cxone-offboard.labels" -}}
helm.sh/chart: {{ include "cxone-offboard.chart" . }}
{{ include "cxone-offboard.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: cxone-offboard
{{- end }}

{{- define "cxone-offboard.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "cxone-offboard.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "cxone-offboard.secretName" -}}
{{- if .Values.existingSecret }}
{{- .Values.existingSecret }}
{{- else }}
{{- include "cxone-offboard.fullname" . }}
{{- end }}
{{- end }}

{{- define "cxone-offboard.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/* Seconds Kubernetes waits after SIGTERM: the worker's drain grace plus a margin. */}}
{{- define "cxone-offboard.terminationGracePeriodSeconds" -}}
{{- add (int .Values.worker.shutdownGraceSecs) (int .Values.worker.terminationGraceMarginSecs) }}
{{- end }}

{{/* The port of config.http.listen ("0.0.0.0:9090" -> 9090). */}}
{{- define "cxone-offboard.httpPort" -}}
{{- $listen := toString (dig "http" "listen" "0.0.0.0:9090" .Values.config) }}
{{- if not (regexMatch ":[0-9]+$" $listen) }}
{{- fail (printf "config.http.listen %q must end with :PORT" $listen) }}
{{- end }}
{{- regexFind "[0-9]+$" $listen }}
{{- end }}

{{/*
The effective configuration: .Values.config with the worker.* values merged in, after refusing
anything that looks like a secret. Returned as JSON (fromJson it).
*/}}
{{- define "cxone-offboard.config" -}}
{{- $config := deepCopy .Values.config }}
{{- include "cxone-offboard.refuseSecrets" (dict "path" "config" "value" $config) }}
{{- $worker := get $config "worker" | default dict }}
{{- if or (hasKey $worker "max_in_flight") (hasKey $worker "shutdown_grace_secs") (hasKey $worker "housekeeping_max_in_flight") }}
{{- fail "set worker.maxInFlight / worker.housekeepingMaxInFlight / worker.shutdownGraceSecs, not config.worker.max_in_flight / housekeeping_max_in_flight / shutdown_grace_secs (they also size KEDA and the termination grace period)" }}
{{- end }}
{{- $_ := set $worker "max_in_flight" (int .Values.worker.maxInFlight) }}
{{- $_ := set $worker "housekeeping_max_in_flight" (int .Values.worker.housekeepingMaxInFlight) }}
{{- $_ := set $worker "shutdown_grace_secs" (int .Values.worker.shutdownGraceSecs) }}
{{- $_ := set $config "worker" $worker }}
{{- if hasKey (get $config "amqp" | default dict) "control_key" }}
{{- fail "config.amqp.control_key is a secret: set secrets.amqpControlKey or the key amqp-control-key of existingSecret (or config.amqp.control_key_file)" }}
{{- end }}
{{- $cxone := get $config "cxone" | default dict }}
{{- $rateLimit := get $cxone "rate_limit" | default dict }}
{{- if hasKey $rateLimit "redis_url" }}
{{- fail "config.cxone.rate_limit.redis_url may carry a password: set quota.redisUrl or the key redis-url of existingSecret (or config.cxone.rate_limit.redis_url_file)" }}
{{- end }}
{{- if hasKey $rateLimit "redis_key" }}
{{- fail "set quota.redisKey, not config.cxone.rate_limit.redis_key" }}
{{- end }}
{{- with .Values.quota.redisKey }}
{{- $_ := set $rateLimit "redis_key" . }}
{{- end }}
{{- if kindIs "string" (get $rateLimit "requests_per_second") }}
{{- $_ := set $rateLimit "requests_per_second" (float64 (get $rateLimit "requests_per_second")) }}
{{- end }}
{{- if $rateLimit }}
{{- $_ := set $cxone "rate_limit" $rateLimit }}
{{- $_ := set $config "cxone" $cxone }}
{{- end }}
{{- $hris := get $config "hris" | default dict }}
{{- range $name, $_ := (get $hris "endpoints" | default dict) }}
{{- if not (regexMatch "^[a-z0-9_]+$" $name) }}
{{- fail (printf "config.hris.endpoints.%s: endpoint names must be lower-case letters, digits and _ (they become OFFBOARD__HRIS__ENDPOINTS__%s__SECRET)" $name (upper $name)) }}
{{- end }}
{{- end }}
{{- toJson $config }}
{{- end }}

{{/* Fails on keys that hold secrets and on URLs with credentials (user:password@). */}}
{{- define "cxone-offboard.refuseSecrets" -}}
{{- /* secret, password, token, api_key and anything ending in _secret/_password/_token/_key_id */}}
{{- $secretKey := "^(.*_)?(secret|password|token|api_key|secret_key|access_key_id)$" }}
{{- if kindIs "map" .value }}
{{- range $k, $v := .value }}
{{- $path := printf "%s.%s" $.path $k }}
{{- if and (regexMatch $secretKey (lower $k)) (not (kindIs "invalid" $v)) }}
{{- fail (printf "%s looks like a secret: put it in `secrets` (or existingSecret), never in `config`" $path) }}
{{- end }}
{{- if and (kindIs "string" $v) (regexMatch "^[A-Za-z][A-Za-z0-9+.-]*://[^/@]*@" $v) }}
{{- fail (printf "%s carries credentials in the URL: put it in `secrets` (or existingSecret), never in `config`" $path) }}
{{- end }}
{{- if and (eq $path "config.amqp.url") (not (kindIs "invalid" $v)) }}
{{- fail "config.amqp.url is a secret (it carries the broker password): set secrets.amqpUrl or the key amqp-url of existingSecret" }}
{{- end }}
{{- include "cxone-offboard.refuseSecrets" (dict "path" $path "value" $v) }}
{{- end }}
{{- else if kindIs "slice" .value }}
{{- range $i, $v := .value }}
{{- include "cxone-offboard.refuseSecrets" (dict "path" (printf "%s[%d]" $.path $i) "value" $v) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
TOML rendering of a map: scalars and arrays first, then one [table] per nested map.
Call with (dict "prefix" "" "value" $map). Nulls are left out. Whole numbers print as integers
(Helm reads YAML numbers as float64).
*/}}
{{- define "cxone-offboard.toml" -}}
{{- $prefix := .prefix }}
{{- $tables := list }}
{{- range $k, $v := .value }}
{{- if kindIs "map" $v }}
{{- $tables = append $tables $k }}
{{- else if not (kindIs "invalid" $v) }}
{{ include "cxone-offboard.tomlKey" $k }} = {{ include "cxone-offboard.tomlValue" $v }}
{{- end }}
{{- end }}
{{- range $k := $tables }}
{{- $full := ternary (include "cxone-offboard.tomlKey" $k) (printf "%s.%s" $prefix (include "cxone-offboard.tomlKey" $k)) (eq $prefix "") }}
{{- $table := get $.value $k }}

[{{ $full }}]
{{- include "cxone-offboard.toml" (dict "prefix" $full "value" $table) }}
{{- end }}
{{- end }}

{{- define "cxone-offboard.tomlKey" -}}
{{- if regexMatch "^[A-Za-z0-9_-]+$" . }}{{ . }}{{ else }}{{ toJson . }}{{ end }}
{{- end }}

{{- define "cxone-offboard.tomlValue" -}}
{{- if kindIs "slice" . }}
{{- $items := list }}
{{- range . }}
{{- $items = append $items (include "cxone-offboard.tomlValue" .) }}
{{- end }}
{{- printf "[%s]" (join ", " $items) }}
{{- else if kindIs "bool" . }}
{{- ternary "true" "false" . }}
{{- else if or (kindIs "float64" .) (kindIs "float32" .) }}
{{- if eq (float64 (int64 .)) (float64 .) }}{{ int64 . }}{{ else }}{{ . }}{{ end }}
{{- else if or (kindIs "int" .) (kindIs "int64" .) (kindIs "int32" .) (kindIs "uint64" .) }}
{{- . }}
{{- else if kindIs "string" . }}
{{- toJson . }}
{{- else }}
{{- fail (printf "config: cannot render %v (%s) as TOML" . (kindOf .)) }}
{{- end }}
{{- end }}

{{/* Environment variables fed from the Secret (chart-made or existingSecret). */}}
{{- define "cxone-offboard.secretEnv" -}}
{{- $secret := include "cxone-offboard.secretName" . }}
- name: OFFBOARD__AMQP__URL
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: amqp-url
- name: OFFBOARD__CXONE__ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: cxone-access-key-id
- name: OFFBOARD__CXONE__ACCESS_KEY_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: cxone-access-key-secret
{{- if eq (dig "cxone" "auth_flow" "access_key" .Values.config) "password" }}
- name: OFFBOARD__CXONE__CLIENT_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: cxone-client-secret
{{- end }}
{{- range $name, $_ := (dig "hris" "endpoints" dict .Values.config) }}
- name: OFFBOARD__HRIS__ENDPOINTS__{{ upper $name }}__SECRET
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: hris-{{ $name }}-secret
{{- end }}
{{- /* Optional keys: in the chart's Secret only when set; in existingSecret when present. */}}
{{- if or .Values.existingSecret .Values.secrets.amqpControlKey }}
- name: OFFBOARD__AMQP__CONTROL_KEY
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: amqp-control-key
      {{- if .Values.existingSecret }}
      optional: true
      {{- end }}
{{- end }}
{{- if or .Values.existingSecret .Values.quota.redisUrl }}
- name: OFFBOARD__CXONE__RATE_LIMIT__REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: redis-url
      {{- if .Values.existingSecret }}
      optional: true
      {{- end }}
{{- end }}
{{- end }}

{{/*
Substitutes this release's names into a file of the chart written for the defaults
(files/alerts.yaml, files/dashboard.json): the queue names of config.amqp, and for the alert
rules the worker selector, the RabbitMQ selector and the runbook base URL. Call with
(dict "root" $ "text" $text). Each default is swapped for a unique token first, so a configured
name that contains another default name is not replaced twice.
*/}}
{{- define "cxone-offboard.substituteNames" -}}
{{- $config := include "cxone-offboard.config" .root | fromJson }}
{{- $amqp := get $config "amqp" | default dict }}
{{- $names := list
  (list "offboard.requests" (get $amqp "requests_queue" | default "offboard.requests"))
  (list "offboard.housekeeping" (get $amqp "housekeeping_queue" | default "offboard.housekeeping"))
  (list "offboard.held" (get $amqp "held_queue" | default "offboard.held"))
  (list "offboard.dead" (get $amqp "dead_queue" | default "offboard.dead"))
  (list "offboard.delay" (get $amqp "delay_queue_prefix" | default "offboard.delay")) }}
{{- $text := .text }}
{{- range $i, $pair := $names }}
{{- $text = replace (index $pair 0) (printf "@@OFFBOARD_NAME_%d@@" $i) $text }}
{{- end }}
{{- range $i, $pair := $names }}
{{- $text = replace (printf "@@OFFBOARD_NAME_%d@@" $i) (index $pair 1) $text }}
{{- end }}
{{- $text }}
{{- end }}

{{/* The alert rules of files/alerts.yaml for this release, as a map (fromYaml). */}}
{{- define "cxone-offboard.alertRules" -}}
{{- $rule := .Values.metrics.prometheusRule }}
{{- $text := include "cxone-offboard.substituteNames" (dict "root" . "text" (.Files.Get "files/alerts.yaml")) }}
{{- $selector := $rule.selector | default (printf "job=%q, namespace=%q" (include "cxone-offboard.fullname" .) .Release.Namespace) }}
{{- $text = replace "job=\"cxone-offboard\"" $selector $text }}
{{- with $rule.rabbitmqSelector }}
{{- $text = regexReplaceAll "queue(=~?)\"([^\"]*)\"" $text (printf "queue${1}\"${2}\", %s" .) }}
{{- end }}
{{- $text = replace "https://github.com/acme/cxone-offboard/blob/main/docs/operations.md" $rule.runbookBaseUrl $text }}
{{- $rules := $text | fromYaml }}
{{- if hasKey $rules "Error" }}
{{- fail (printf "files/alerts.yaml after substitution: %s" $rules.Error) }}
{{- end }}
{{- with $rule.additionalLabels }}
{{- range $group := $rules.groups }}
{{- range $r := $group.rules }}
{{- /* The rule's own labels (severity) win over additionalLabels. */}}
{{- $_ := set $r "labels" (merge ($r.labels | default dict) (deepCopy $.Values.metrics.prometheusRule.additionalLabels)) }}
{{- end }}
{{- end }}
{{- end }}
{{- toJson $rules }}
{{- end }}

{{/* The pod's config volume, tmp volume and the mounts for them. */}}
{{- define "cxone-offboard.volumes" -}}
- name: config
  configMap:
    name: {{ include "cxone-offboard.fullname" . }}
- name: tmp
  emptyDir:
    {{- with .Values.tmpVolume.sizeLimit }}
    sizeLimit: {{ . }}
    {{- end }}
{{- with .Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "cxone-offboard.volumeMounts" -}}
- name: config
  mountPath: /etc/cxone-offboard
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- with .Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end }}
