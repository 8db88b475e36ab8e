{{/* The verifier and draft tiers share one shape: (dict "root" $ "component" "verifier") ------------------- */}}

{{- define "dspark.tierDeployment" -}}
{{- $root := .root }}
{{- $c := index $root.Values .component }}
{{- $ctx := dict "root" $root "component" .component }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "dspark.componentName" $ctx }}
  labels: {{- include "dspark.labels" $ctx | nindent 4 }}
spec:
  {{- if not $c.autoscaling.enabled }}
  replicas: {{ $c.replicaCount }}
  {{- end }}
  {{- include "dspark.strategy" $root | nindent 2 }}
  selector:
    matchLabels: {{- include "dspark.selectorLabels" $ctx | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "dspark.selectorLabels" $ctx | nindent 8 }}
        {{- with $root.Values.podLabels }}{{ toYaml . | nindent 8 }}{{ end }}
      {{- with $root.Values.podAnnotations }}
      annotations: {{- toYaml . | nindent 8 }}
      {{- end }}
    spec:
      {{- include "dspark.podCommon" $root | nindent 6 }}
      terminationGracePeriodSeconds: {{ $c.terminationGracePeriodSeconds }}
      initContainers: {{- include "dspark.prepareModel" $root | nindent 8 }}
      containers:
        - name: {{ .component }}
          image: {{ include "dspark.image" $root }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          args:
            - serve
            - {{ .component }}
            - --model={{ $root.Values.model.name }}
            - --host=0.0.0.0
            - --port={{ $c.port }}
            - --metrics-port={{ $c.metricsPort }}
            - --device={{ $c.device }}
            - --dtype={{ $c.dtype }}
            - --max-requests={{ $c.maxRequests }}
            - --max-context={{ $c.maxContext }}
            - --drain={{ $c.drain }}
            {{- if eq .component "draft" }}
            - --max-support={{ $c.maxSupport }}
            {{- end }}
            {{- with $c.extraArgs }}{{ toYaml . | nindent 12 }}{{ end }}
          env: {{- include "dspark.env" $ctx | nindent 12 }}
          ports:
            - name: grpc
              containerPort: {{ $c.port }}
            {{- if $c.metricsPort }}
            - name: metrics
              containerPort: {{ $c.metricsPort }}
            {{- end }}
          startupProbe: {{- include "dspark.grpcProbe" (dict "root" $root "port" $c.port "timings" $c.startupProbe) | nindent 12 }}
          readinessProbe: {{- include "dspark.grpcProbe" (dict "root" $root "port" $c.port "timings" $c.readinessProbe) | nindent 12 }}
          livenessProbe: {{- include "dspark.grpcProbe" (dict "root" $root "port" $c.port "timings" $c.livenessProbe) | nindent 12 }}
          {{- include "dspark.preStop" $root | nindent 10 }}
          securityContext: {{- toYaml $root.Values.securityContext | nindent 12 }}
          resources: {{- toYaml $c.resources | nindent 12 }}
          volumeMounts: {{- include "dspark.volumeMounts" $root | nindent 12 }}
      volumes: {{- include "dspark.volumes" $root | nindent 8 }}
      {{- with $c.nodeSelector }}
      nodeSelector: {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $c.tolerations }}
      tolerations: {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $c.affinity }}
      affinity: {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end }}

{{/* a ClusterIP Service (its address reaches pods as environment variables, no DNS needed) and a headless one
     (every pod's address, for the router to see each replica) */}}
{{- define "dspark.tierServices" -}}
{{- $root := .root }}
{{- $c := index $root.Values .component }}
{{- $ctx := dict "root" $root "component" .component }}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "dspark.componentName" $ctx }}
  labels: {{- include "dspark.labels" $ctx | nindent 4 }}
spec:
  type: ClusterIP
  selector: {{- include "dspark.selectorLabels" $ctx | nindent 4 }}
  ports:
    - name: grpc
      port: {{ $c.port }}
      targetPort: grpc
    {{- if $c.metricsPort }}
    - name: metrics
      port: {{ $c.metricsPort }}
      targetPort: metrics
    {{- end }}
---
apiVersion: v1
kind: Service
metadata:
  name: {{ include "dspark.componentName" $ctx }}-headless
  labels: {{- include "dspark.labels" $ctx | nindent 4 }}
spec:
  clusterIP: None
  publishNotReadyAddresses: false
  selector: {{- include "dspark.selectorLabels" $ctx | nindent 4 }}
  ports:
    - name: grpc
      port: {{ $c.port }}
      targetPort: grpc
{{- end }}

{{/* (dict "root" $ "component" "verifier") */}}
{{- define "dspark.pdb" -}}
{{- if .root.Values.pdb.enabled }}
{{- $ctx := dict "root" .root "component" .component }}
apiVersion: {{ include "dspark.pdbApiVersion" .root }}
kind: PodDisruptionBudget
metadata:
  name: {{ include "dspark.componentName" $ctx }}
  labels: {{- include "dspark.labels" $ctx | nindent 4 }}
spec:
  maxUnavailable: {{ .root.Values.pdb.maxUnavailable }}
  selector:
    matchLabels: {{- include "dspark.selectorLabels" $ctx | nindent 6 }}
{{- end }}
{{- end }}

{{/* default deny for a tier: only router pods reach its gRPC port, only the monitoring namespace its metrics */}}
{{- define "dspark.tierNetworkPolicy" -}}
{{- if .root.Values.networkPolicy.enabled }}
{{- $c := index .root.Values .component }}
{{- $ctx := dict "root" .root "component" .component }}
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: {{ include "dspark.componentName" $ctx }}
  labels: {{- include "dspark.labels" $ctx | nindent 4 }}
spec:
  podSelector:
    matchLabels: {{- include "dspark.selectorLabels" $ctx | nindent 6 }}
  policyTypes: [Ingress]
  ingress:
    - from:
        - podSelector:
            matchLabels: {{- include "dspark.selectorLabels" (dict "root" .root "component" "router") | nindent 14 }}
      ports:
        - port: grpc
    {{- if $c.metricsPort }}
    - from:
        - namespaceSelector: {{- toYaml .root.Values.networkPolicy.monitoringNamespaceSelector | nindent 12 }}
      ports:
        - port: metrics
    {{- end }}
{{- end }}
{{- end }}
