{{- define "fdl.fullname" -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 52 | trimSuffix "-" -}}
{{- end -}}

{{- define "fdl.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "fdl.selector" -}}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "fdl.image" -}}
{{- $repo := index .root.Values.image.repositories .component -}}
image: {{ printf "%s%s:%s" .root.Values.image.registry $repo .root.Values.image.tag | quote }}
imagePullPolicy: {{ .root.Values.image.pullPolicy }}
{{- end -}}

{{/* Every pod: the images' unprivileged user, no privilege escalation, read-only root file system. */}}
{{- define "fdl.podSecurityContext" -}}
securityContext:
  runAsNonRoot: true
  runAsUser: 10001
  runAsGroup: 10001
  fsGroup: 10001
  seccompProfile:
    type: RuntimeDefault
{{- end -}}

{{- define "fdl.containerSecurityContext" -}}
securityContext:
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities:
    drop: [ALL]
{{- end -}}

{{/* Writable scratch for Flower's app installs (FLWR_HOME) and temporary files under a read-only root. */}}
{{- define "fdl.scratchMounts" -}}
- name: flwr-home
  mountPath: /home/fl/.flwr
- name: tmp
  mountPath: /tmp
{{- end -}}

{{- define "fdl.scratchVolumes" -}}
- name: flwr-home
  emptyDir: {}
- name: tmp
  emptyDir: {}
{{- end -}}

{{- define "fdl.tcpProbe" -}}
exec:
  command: ["python", "-c", "import socket; socket.create_connection(('127.0.0.1', {{ .port }}), 3)"]
{{- end -}}

{{/* OpenTelemetry's standard variables (fl_core/tracing.py): spans over OTLP/HTTP to tracing.otlpEndpoint, when set. */}}
{{- define "fdl.tracingEnv" -}}
{{- with .root.Values.tracing.otlpEndpoint }}
- name: OTEL_TRACES_EXPORTER
  value: otlp
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ . | quote }}
- name: OTEL_SERVICE_NAME
  value: {{ $.service | quote }}
{{- end }}
{{- end -}}

{{/* The tracking server of this release, or with mlflow.enabled false the one mlflow.url names; empty: none. */}}
{{- define "fdl.mlflowUrl" -}}
{{- if and .Values.mlflow.enabled .Values.mlflow.url -}}
{{- fail "mlflow.url: only with mlflow.enabled false (this release runs its own tracking server)" -}}
{{- end -}}
{{- ternary (printf "http://%s-mlflow:%v" (include "fdl.fullname" .) .Values.mlflow.port) .Values.mlflow.url .Values.mlflow.enabled -}}
{{- end -}}

{{/* Blue-green (README "Rollouts"): the clients' Service, and the labels by which it, and the Redis and MLflow that
both slots share, find each slot's pods across the two releases (with the release's own instance label, so a third
release under the same Service name is neither served nor admitted). */}}
{{- define "fdl.gatewayService" -}}
{{- .Values.serving.gateway.service.name | default (printf "%s-gateway" (include "fdl.fullname" .)) -}}
{{- end -}}

{{- define "fdl.slotLabels" -}}
{{- with .Values.serving.gateway.slot -}}
federated-dp-llm/slot: {{ . | quote }}
federated-dp-llm/gateway-service: {{ include "fdl.gatewayService" $ | quote }}
{{- end }}
{{- end -}}

{{/* Pods of the other slot's release (serving.gateway.service.otherRelease) under this release's Service: a
NetworkPolicy peer; none without one. */}}
{{- define "fdl.slotPeers" -}}
{{- with .root.Values.serving.gateway.service.otherRelease -}}
{{- toYaml (list (dict "podSelector" (dict "matchLabels" (dict "app.kubernetes.io/instance" . "app.kubernetes.io/component" $.component "federated-dp-llm/gateway-service" (include "fdl.gatewayService" $.root))))) -}}
{{- else -}}
[]
{{- end -}}
{{- end -}}
