{{/* Autoscaling: HPAs, KEDA ScaledObjects and prometheus-adapter rules on one list of signals per tier. ------ */}}

{{/* autoscaling/v2 from 1.23 on; helm template's default API list has it whatever --kube-version says, so both count */}}
{{- define "dspark.hpaApiVersion" -}}
{{- if and (.Capabilities.APIVersions.Has "autoscaling/v2") (semverCompare ">=1.23-0" .Capabilities.KubeVersion.Version) -}}
autoscaling/v2
{{- else -}}
autoscaling/v2beta2
{{- end }}
{{- end }}

{{/* "true" when KEDA owns the tiers' scaling (its CRD exists and it is asked for) */}}
{{- define "dspark.kedaRendered" -}}
{{- if and .Values.autoscaling.keda.enabled (.Capabilities.APIVersions.Has "keda.sh/v1alpha1/ScaledObject") }}true{{ end }}
{{- end }}

{{/* The scaling signals of a tier, as YAML (dict "root" $ "component" "verifier"): per signal its metric name in
the custom/external metrics API, the HPA metric type (Pods: averaged over the tier's pods; External: one value for
the namespace), the target (an average per pod; type Value: the tier-wide value), the series it is made of
(seriesQuery + metricsQuery: prometheus-adapter's rule), and the tier-wide PromQL KEDA queries. A target of 0 drops
the signal. Series carry `namespace` and `pod` labels (prometheus-operator's monitors and the usual kubernetes-pods
scrape config attach them); the tier is told apart by its pods (their names in KEDA's queries, the Pod resource in
the adapter's), never by the scraped `service` label, which a ServiceMonitor's own `service` label renames. */}}
{{- define "dspark.scalingSignals" -}}
{{- $root := .root }}
{{- $a := (index $root.Values .component).autoscaling }}
{{- $pods := printf "namespace=%q,pod=~%q" $root.Release.Namespace (printf "%s-.*" (include "dspark.componentName" .)) }}
{{- $ns := printf "namespace=%q" $root.Release.Namespace }}
{{- if eq .component "verifier" }}
{{- if $a.targetSessions }}
- name: dspark_verifier_sessions
  type: Pods
  target: {{ $a.targetSessions }}
  seriesQuery: 'dspark_sessions{namespace!="",pod!=""}'
  metricsQuery: 'sum(dspark_sessions{<<.LabelMatchers>>}) by (<<.GroupBy>>)'
  query: 'sum(dspark_sessions{ {{- $pods }}})'
{{- end }}
{{- if $a.targetKvUsage }}
- name: dspark_verifier_kv_usage
  type: Pods
  target: {{ $a.targetKvUsage }}
  seriesQuery: 'dspark_verifier_kv_tokens{namespace!="",pod!=""}'
  metricsQuery: 'sum(dspark_verifier_kv_tokens{<<.LabelMatchers>>}) by (<<.GroupBy>>) / sum(dspark_verifier_kv_capacity_tokens{<<.LabelMatchers>>}) by (<<.GroupBy>>)'
  query: 'sum(dspark_verifier_kv_tokens{ {{- $pods }}}) / sum(dspark_verifier_kv_capacity_tokens{ {{- $pods }}})'
  keda: Value
{{- end }}
{{- if $a.targetQueueDepth }}
- name: dspark_router_queue_depth
  type: External
  target: {{ $a.targetQueueDepth }}
  seriesQuery: 'dspark_queue_depth{namespace!=""}'
  metricsQuery: 'sum(dspark_queue_depth{<<.LabelMatchers>>}) by (namespace)'
  query: 'sum(dspark_queue_depth{ {{- $ns }}})'
{{- end }}
{{- else if eq .component "draft" }}
{{- if $a.targetSessions }}
- name: dspark_draft_sessions
  type: Pods
  target: {{ $a.targetSessions }}
  seriesQuery: 'dspark_sessions{namespace!="",pod!=""}'
  metricsQuery: 'sum(dspark_sessions{<<.LabelMatchers>>}) by (<<.GroupBy>>)'
  query: 'sum(dspark_sessions{ {{- $pods }}})'
{{- end }}
{{- if $a.targetRoundSeconds }}
- name: dspark_draft_round_seconds
  type: Pods
  target: {{ $a.targetRoundSeconds }}
  seriesQuery: 'dspark_rpc_seconds_count{method="draft",namespace!="",pod!=""}'
  metricsQuery: 'sum(rate(dspark_rpc_seconds_sum{method="draft",<<.LabelMatchers>>}[1m])) by (<<.GroupBy>>) / sum(rate(dspark_rpc_seconds_count{method="draft",<<.LabelMatchers>>}[1m])) by (<<.GroupBy>>)'
  query: 'sum(rate(dspark_rpc_seconds_sum{method="draft",{{ $pods }}}[1m])) / sum(rate(dspark_rpc_seconds_count{method="draft",{{ $pods }}}[1m]))'
  keda: Value
{{- end }}
{{- else if eq .component "router" }}
{{- if $a.targetOngoingRequests }}
- name: dspark_router_ongoing_requests
  type: Pods
  target: {{ $a.targetOngoingRequests }}
  seriesQuery: 'dspark_running_requests{namespace!="",pod!=""}'
  metricsQuery: 'sum(dspark_running_requests{<<.LabelMatchers>>} + dspark_queue_depth{<<.LabelMatchers>>}) by (<<.GroupBy>>)'
  query: 'sum(dspark_running_requests{ {{- $pods }}}) + sum(dspark_queue_depth{ {{- $pods }}})'
{{- end }}
{{- end }}
{{- end }}

{{/* The HPA of a tier (dict "root" $ "component" "verifier"), unless KEDA owns it */}}
{{- define "dspark.hpa" -}}
{{- $root := .root }}
{{- $c := index $root.Values .component }}
{{- if and $c.autoscaling.enabled (not (include "dspark.kedaRendered" $root)) (or (ne .component "draft") $c.enabled) }}
{{- $signals := include "dspark.scalingSignals" . | fromYamlArray }}
{{- if not $signals }}
{{- fail (printf "%s.autoscaling: every target is 0; set at least one" .component) }}
{{- end }}
{{- if lt (int $c.autoscaling.maxReplicas) (int $c.autoscaling.minReplicas) }}
{{- fail (printf "%s.autoscaling.maxReplicas is below minReplicas" .component) }}
{{- end }}
apiVersion: {{ include "dspark.hpaApiVersion" $root }}
kind: HorizontalPodAutoscaler
metadata:
  name: {{ include "dspark.componentName" . }}
  labels: {{- include "dspark.labels" . | nindent 4 }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ include "dspark.componentName" . }}
  minReplicas: {{ $c.autoscaling.minReplicas }}
  maxReplicas: {{ $c.autoscaling.maxReplicas }}
  metrics:
    {{- range $signals }}
    {{- if eq .type "Pods" }}
    - type: Pods
      pods:
        metric: {name: {{ .name }}}
        target: {type: AverageValue, averageValue: {{ .target | quote }}}
    {{- else }}
    - type: External
      external:
        metric: {name: {{ .name }}}
        target: {type: AverageValue, averageValue: {{ .target | quote }}}
    {{- end }}
    {{- end }}
  {{- with $c.autoscaling.behavior }}
  behavior: {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
{{- end }}

{{/* The KEDA ScaledObject of a tier: the same signals as Prometheus triggers, the same bounds and behavior */}}
{{- define "dspark.scaledObject" -}}
{{- $root := .root }}
{{- $c := index $root.Values .component }}
{{- if and $c.autoscaling.enabled (include "dspark.kedaRendered" $root) (or (ne .component "draft") $c.enabled) }}
{{- $k := $root.Values.autoscaling.keda }}
apiVersion: keda.sh/v1alpha1
kind: ScaledObject
metadata:
  name: {{ include "dspark.componentName" . }}
  labels: {{- include "dspark.labels" . | nindent 4 }}
spec:
  scaleTargetRef:
    name: {{ include "dspark.componentName" . }}
  minReplicaCount: {{ $c.autoscaling.minReplicas }}
  maxReplicaCount: {{ $c.autoscaling.maxReplicas }}
  pollingInterval: {{ $k.pollingInterval }}
  {{- with $c.autoscaling.behavior }}
  advanced:
    horizontalPodAutoscalerConfig:
      behavior: {{- toYaml . | nindent 8 }}
  {{- end }}
  triggers:
    {{- range include "dspark.scalingSignals" . | fromYamlArray }}
    - type: prometheus
      name: {{ .name }}
      metricType: {{ .keda | default "AverageValue" }}
      metadata:
        serverAddress: {{ $k.prometheusAddress }}
        query: {{ .query | quote }}
        threshold: {{ .target | quote }}
    {{- end }}
{{- end }}
{{- end }}
