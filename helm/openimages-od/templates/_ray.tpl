{{/*
The RayCluster spec (head + `download` worker group), shared by the standalone
RayCluster and the cluster a prepare RayJob creates for itself.

The chart sets its own probes on Ray containers so KubeRay does not inject its
default exec probes (they call wget, which the slim worker image lacks): the
head is probed on the dashboard's GCS health endpoint, workers on the raylet
health endpoint of the dashboard agent. Timeouts and thresholds are at least
as tolerant as KubeRay's defaults: a download worker at its CPU limit answers
slowly and must not be killed for it.

Token authentication (authOptions): KubeRay generates the token, keeps it in a
Secret and injects RAY_AUTH_MODE / RAY_AUTH_TOKEN into the Ray containers and
the submitter; the health endpoints stay open for the probes.
*/}}
{{- define "oiod.rayClusterSpec" -}}
{{- $v := .Values }}
{{- $pr := $v.ray.probes }}
rayVersion: {{ $v.ray.rayVersion | quote }}
{{- if eq $v.ray.auth.mode "token" }}
authOptions:
  mode: token
{{- end }}
enableInTreeAutoscaling: {{ $v.ray.enableInTreeAutoscaling }}
{{- if $v.ray.enableInTreeAutoscaling }}
autoscalerOptions:
  upscalingMode: {{ $v.ray.autoscaler.upscalingMode }}
  idleTimeoutSeconds: {{ $v.ray.autoscaler.idleTimeoutSeconds }}
  imagePullPolicy: {{ $v.images.worker.pullPolicy }}
  resources:
    {{- toYaml $v.ray.autoscaler.resources | nindent 4 }}
  securityContext:
    {{- include "oiod.containerSecurityContext" . | nindent 4 }}
{{- end }}
headGroupSpec:
  rayStartParams:
    {{- include "oiod.rayStartParams" $v.ray.head.rayStartParams | nindent 4 }}
  template:
    metadata:
      {{- include "oiod.podMetadata" (dict "root" . "component" "ray-head" "values" $v.ray.head) | nindent 6 }}
    spec:
      serviceAccountName: {{ include "oiod.serviceAccountName" (list . "ray-head") }}
      # The in-tree autoscaler sidecar needs the API token; nothing else does.
      automountServiceAccountToken: {{ $v.ray.enableInTreeAutoscaling }}
      {{- include "oiod.imagePullSecrets" . | nindent 6 }}
      securityContext:
        {{- include "oiod.podSecurityContext" . | nindent 8 }}
      {{- include "oiod.scheduling" $v.ray.head | nindent 6 }}
      containers:
        - name: ray-head
          image: {{ include "oiod.image" (list . $v.images.worker) }}
          imagePullPolicy: {{ $v.images.worker.pullPolicy }}
          ports:
            - name: gcs
              containerPort: 6379
            - name: dashboard
              containerPort: 8265
            - name: client
              containerPort: 10001
            - name: metrics
              containerPort: 8080
          env:
            {{- include "oiod.env" . | nindent 12 }}
          resources:
            {{- toYaml $v.ray.head.resources | nindent 12 }}
          securityContext:
            {{- include "oiod.containerSecurityContext" . | nindent 12 }}
          readinessProbe:
            httpGet:
              path: /api/gcs_healthz
              port: 8265
            initialDelaySeconds: 10
            periodSeconds: 5
            timeoutSeconds: {{ max 5 $pr.readinessTimeoutSeconds }}
            failureThreshold: {{ $pr.readinessFailureThreshold }}
          livenessProbe:
            httpGet:
              path: /api/gcs_healthz
              port: 8265
            initialDelaySeconds: 30
            periodSeconds: 5
            timeoutSeconds: {{ max 5 $pr.livenessTimeoutSeconds }}
            failureThreshold: {{ $pr.livenessFailureThreshold }}
          volumeMounts:
            {{- include "oiod.volumeMounts" (dict "root" . "shm" $v.ray.head.shmSizeLimit) | nindent 12 }}
      volumes:
        {{- include "oiod.volumes" (dict "root" . "shm" $v.ray.head.shmSizeLimit) | nindent 8 }}
workerGroupSpecs:
  - groupName: download
    replicas: {{ $v.ray.download.replicas }}
    minReplicas: {{ $v.ray.download.minReplicas }}
    maxReplicas: {{ $v.ray.download.maxReplicas }}
    rayStartParams:
      {{- include "oiod.rayStartParams" $v.ray.download.rayStartParams | nindent 6 }}
    template:
      metadata:
        {{- include "oiod.podMetadata" (dict "root" . "component" "ray-download" "values" $v.ray.download) | nindent 8 }}
      spec:
        serviceAccountName: {{ include "oiod.serviceAccountName" (list . "ray-worker") }}
        automountServiceAccountToken: false
        {{- include "oiod.imagePullSecrets" . | nindent 8 }}
        securityContext:
          {{- include "oiod.podSecurityContext" . | nindent 10 }}
        {{- include "oiod.scheduling" $v.ray.download | nindent 8 }}
        containers:
          - name: ray-worker
            image: {{ include "oiod.image" (list . $v.images.worker) }}
            imagePullPolicy: {{ $v.images.worker.pullPolicy }}
            env:
              {{- include "oiod.env" . | nindent 14 }}
            resources:
              {{- toYaml $v.ray.download.resources | nindent 14 }}
            securityContext:
              {{- include "oiod.containerSecurityContext" . | nindent 14 }}
            readinessProbe:
              httpGet:
                path: /api/local_raylet_healthz
                port: 52365
              initialDelaySeconds: 10
              periodSeconds: 5
              timeoutSeconds: {{ $pr.readinessTimeoutSeconds }}
              failureThreshold: {{ $pr.readinessFailureThreshold }}
            livenessProbe:
              httpGet:
                path: /api/local_raylet_healthz
                port: 52365
              initialDelaySeconds: 30
              periodSeconds: 5
              timeoutSeconds: {{ $pr.livenessTimeoutSeconds }}
              failureThreshold: {{ $pr.livenessFailureThreshold }}
            volumeMounts:
              {{- include "oiod.volumeMounts" (dict "root" . "shm" $v.ray.download.shmSizeLimit) | nindent 14 }}
        volumes:
          {{- include "oiod.volumes" (dict "root" . "shm" $v.ray.download.shmSizeLimit) | nindent 10 }}
{{- end }}

{{/* KubeRay wants every `ray start` parameter as a string, and {} when there are none. */}}
{{- define "oiod.rayStartParams" -}}
{{- $out := dict }}
{{- range $k, $val := . }}
{{- $_ := set $out $k (toString $val) }}
{{- end }}
{{- toYaml $out }}
{{- end }}
