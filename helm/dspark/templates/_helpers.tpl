{{/* Names ------------------------------------------------------------------------------------------------- */}}

{{- define "dspark.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "dspark.fullname" -}}
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

{{/* "<fullname>-<component>", e.g. dspark-verifier (dict "root" $ "component" "verifier") */}}
{{- define "dspark.componentName" -}}
{{- printf "%s-%s" (include "dspark.fullname" .root) .component | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The prefix of the variables Kubernetes injects for a Service: dspark-verifier -> DSPARK_VERIFIER */}}
{{- define "dspark.envPrefix" -}}
{{- include "dspark.componentName" . | upper | replace "-" "_" }}
{{- end }}

{{- define "dspark.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "dspark.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "dspark.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Labels (dict "root" $ "component" "verifier") ----------------------------------------------------------- */}}

{{- define "dspark.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dspark.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- with .component }}
app.kubernetes.io/component: {{ . }}
{{- end }}
{{- end }}

{{- define "dspark.labels" -}}
helm.sh/chart: {{ include "dspark.chart" .root }}
{{ include "dspark.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: dspark
{{- end }}

{{- define "dspark.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* API versions ----------------------------------------------------------------------------------------- */}}

{{/* policy/v1 from 1.21 on; helm template's default API list has it whatever --kube-version says, so both count */}}
{{- define "dspark.pdbApiVersion" -}}
{{- if and (.Capabilities.APIVersions.Has "policy/v1") (semverCompare ">=1.21-0" .Capabilities.KubeVersion.Version) -}}
policy/v1
{{- else -}}
policy/v1beta1
{{- end }}
{{- end }}

{{/* native gRPC probes from 1.24 on (beta, on by default); before, exec `dspark health` */}}
{{- define "dspark.nativeGrpcProbe" -}}
{{- if semverCompare ">=1.24-0" .Capabilities.KubeVersion.Version }}true{{ end }}
{{- end }}

{{/* Pod pieces ------------------------------------------------------------------------------------------- */}}

{{/* a probe on a gRPC port: (dict "root" $ "port" 50061 "timings" .Values.verifier.startupProbe) */}}
{{- define "dspark.grpcProbe" -}}
{{- if include "dspark.nativeGrpcProbe" .root -}}
grpc:
  port: {{ .port }}
{{- else -}}
exec:
  command: [dspark, health, "127.0.0.1:{{ .port }}", --timeout, {{ .timings.timeoutSeconds | default 5 | quote }}]
{{- end }}
{{ toYaml .timings }}
{{- end }}

{{/* OTEL_* variables from the otel block (none when otel.endpoint is empty): (dict "root" $ "component" "verifier") */}}
{{- define "dspark.otelEnv" -}}
{{- with .root.Values.otel }}
{{- if .endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ .endpoint | quote }}
- name: OTEL_EXPORTER_OTLP_INSECURE
  value: {{ .insecure | quote }}
- name: OTEL_TRACES_EXPORTER
  value: otlp
- name: OTEL_TRACES_SAMPLER
  value: parentbased_traceidratio
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ .samplingRatio | quote }}
- name: OTEL_SERVICE_NAME
  value: dspark-{{ $.component }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: "k8s.namespace.name={{ $.root.Release.Namespace }},k8s.pod.name=$(DSPARK_POD_NAME),service.instance.id=$(DSPARK_POD_NAME)"
{{- end }}
{{- end }}
{{- end }}

{{/* environment of every dspark container: (dict "root" $ "component" "verifier") */}}
{{- define "dspark.env" -}}
- name: DSPARK_POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: DSPARK_HOME
  value: {{ .root.Values.model.home | quote }}
- name: HOME
  value: /home/dspark
{{- include "dspark.otelEnv" . }}
{{- with .root.Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* the init container that converts the model into the model volume once */}}
{{- define "dspark.prepareModel" -}}
- name: prepare-model
  image: {{ include "dspark.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  args: [models, --prepare, {{ .Values.model.name | quote }}]
  env:
    - name: DSPARK_HOME
      value: {{ .Values.model.home | quote }}
    - name: HOME
      value: /home/dspark
  securityContext: {{- toYaml .Values.securityContext | nindent 4 }}
  resources: {{- toYaml .Values.model.prepare.resources | nindent 4 }}
  volumeMounts: {{- include "dspark.volumeMounts" . | nindent 4 }}
{{- end }}

{{- define "dspark.volumeMounts" -}}
- name: model
  mountPath: {{ .Values.model.home }}
- name: home
  mountPath: /home/dspark
- name: tmp
  mountPath: /tmp
{{- end }}

{{- define "dspark.volumes" -}}
- name: model
{{- if eq .Values.model.volume.type "pvc" }}
  persistentVolumeClaim:
    claimName: {{ required "model.volume.claimName is required when model.volume.type is pvc" .Values.model.volume.claimName }}
{{- else }}
  emptyDir:
    sizeLimit: {{ .Values.model.volume.sizeLimit }}
{{- end }}
- name: home
  emptyDir:
    sizeLimit: 256Mi
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpSizeLimit }}
{{- end }}

{{/* what every pod spec starts with; router pods with discovery `kubernetes` use the router's ServiceAccount and
mount its token (the only pods that talk to the API server) */}}
{{- define "dspark.podCommon" -}}
{{- if .routerDiscovery }}
{{- $root := .root }}
serviceAccountName: {{ include "dspark.componentName" (dict "root" $root "component" "router") }}
automountServiceAccountToken: true
enableServiceLinks: true
securityContext: {{- toYaml $root.Values.podSecurityContext | nindent 2 }}
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets: {{- toYaml . | nindent 2 }}
{{- end }}
{{- else }}
serviceAccountName: {{ include "dspark.serviceAccountName" . }}
automountServiceAccountToken: false
enableServiceLinks: true
securityContext: {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets: {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
{{- end }}

{{- define "dspark.preStop" -}}
lifecycle:
  preStop:
    exec:
      command: [sleep, {{ .Values.preStopSeconds | quote }}]
{{- end }}

{{/* the rolling update every tier uses: a new pod is Ready before an old one goes */}}
{{- define "dspark.strategy" -}}
strategy:
  type: RollingUpdate
  rollingUpdate:
    maxUnavailable: 0
    maxSurge: 1
{{- end }}

{{/* the router's address of a tier: (dict "root" $ "component" "verifier" "port" 50061 "discovery" "env"|"dns") */}}
{{- define "dspark.tierAddress" -}}
{{- if eq .discovery "kubernetes" -}}
k8s://{{ .root.Release.Namespace }}/{{ include "dspark.componentName" . }}-headless:grpc
{{- else if eq .discovery "dns" -}}
{{ include "dspark.componentName" . }}.{{ .root.Release.Namespace }}.svc.{{ .root.Values.router.clusterDomain }}:{{ .port }}
{{- else -}}
${ {{- include "dspark.envPrefix" . }}_SERVICE_HOST}:${ {{- include "dspark.envPrefix" . }}_SERVICE_PORT_GRPC}
{{- end }}
{{- end }}

{{- define "dspark.apiKeySecretName" -}}
{{- default (include "dspark.componentName" (dict "root" . "component" "api-key")) .Values.apiKey.existingSecret }}
{{- end }}

{{/* "true" when the KubeRay RayService replaces the router Deployment */}}
{{- define "dspark.rayServiceRendered" -}}
{{- if and .Values.router.rayService.enabled (.Capabilities.APIVersions.Has "ray.io/v1/RayService") }}true{{ end }}
{{- end }}

{{/* The Ray Serve config of the router: (dict "root" $ "discovery" "env"|"dns") */}}
{{- define "dspark.serveConfig" -}}
{{- $v := .root.Values.router -}}
proxy_location: EveryNode
http_options:
  host: 0.0.0.0
  port: {{ $v.httpPort }}
grpc_options:
  port: {{ $v.port }}
  grpc_servicer_functions:
    - dspark.v1.generation_pb2_grpc.add_GenerationServiceServicer_to_server
applications:
  - name: dspark
    route_prefix: /
    import_path: dspark.router.app:app_builder
    args:
      verifier: {{ include "dspark.tierAddress" (dict "root" $.root "component" "verifier" "port" $.root.Values.verifier.port "discovery" $.discovery) | quote }}
      {{- if $.root.Values.draft.enabled }}
      draft: {{ include "dspark.tierAddress" (dict "root" $.root "component" "draft" "port" $.root.Values.draft.port "discovery" $.discovery) | quote }}
      {{- else }}
      draft: null
      {{- end }}
      model: {{ $.root.Values.model.name | quote }}
      policy: {{ $v.policy | quote }}
      max_tokens: {{ $v.maxTokens }}
      max_queue: {{ $v.maxQueue }}
      verifier_recover_s: {{ $v.verifierRecoverSeconds }}
      draft_retry_s: {{ $v.draftRetrySeconds }}
      max_request_bytes: {{ int $v.maxRequestBytes }}
    deployments:
      - name: DSparkRouter
        max_ongoing_requests: {{ $v.serve.maxOngoingRequests }}
        autoscaling_config:
          min_replicas: {{ $v.serve.autoscaling.minReplicas }}
          max_replicas: {{ $v.serve.autoscaling.maxReplicas }}
          target_ongoing_requests: {{ $v.serve.autoscaling.targetOngoingRequests }}
          upscale_delay_s: {{ $v.serve.autoscaling.upscaleDelaySeconds }}
          downscale_delay_s: {{ $v.serve.autoscaling.downscaleDelaySeconds }}
        ray_actor_options:
          num_cpus: {{ $v.serve.numCpus }}
{{- end }}
