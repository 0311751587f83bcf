{{/*
The RayCluster spec (head + `download` worker group), shared by the standalone
RayCluster and the cluster a prepare RayJob creates for itself.

The chart sets its own probes on Ray containers so KubeRay does not inject its
default exec probes (they call wget, which the slim worker image lacks): the
head is probed on the dashboard's GCS health endpoint, workers on the raylet
health endpoint of the dashboard agent.
*/}}
{{- define "oiod.rayClusterSpec" -}}
{{- $v := .Values }}
rayVersion: {{ $v.ray.rayVersion | quote }}
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
      labels:
        {{- include "oiod.componentLabels" (list . "ray-head") | nindent 8 }}
    spec:
      serviceAccountName: {{ include "oiod.serviceAccountName" . }}
      # The in-tree autoscaler sidecar needs the API token; nothing else does.
      automountServiceAccountToken: {{ $v.ray.enableInTreeAutoscaling }}
      {{- include "oiod.imagePullSecrets" . | nindent 6 }}
      securityContext:
        {{- include "oiod.podSecurityContext" . | nindent 8 }}
      {{- with $v.ray.head.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.ray.head.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
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
            timeoutSeconds: 2
            failureThreshold: 10
          livenessProbe:
            httpGet:
              path: /api/gcs_healthz
              port: 8265
            initialDelaySeconds: 30
            periodSeconds: 10
            timeoutSeconds: 2
            failureThreshold: 12
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
        labels:
          {{- include "oiod.componentLabels" (list . "ray-download") | nindent 10 }}
      spec:
        serviceAccountName: {{ include "oiod.serviceAccountName" . }}
        automountServiceAccountToken: false
        {{- include "oiod.imagePullSecrets" . | nindent 8 }}
        securityContext:
          {{- include "oiod.podSecurityContext" . | nindent 10 }}
        {{- with $v.ray.download.nodeSelector }}
        nodeSelector:
          {{- toYaml . | nindent 10 }}
        {{- end }}
        {{- with $v.ray.download.tolerations }}
        tolerations:
          {{- toYaml . | nindent 10 }}
        {{- end }}
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
              timeoutSeconds: 2
              failureThreshold: 10
            livenessProbe:
              httpGet:
                path: /api/local_raylet_healthz
                port: 52365
              initialDelaySeconds: 30
              periodSeconds: 10
              timeoutSeconds: 2
              failureThreshold: 12
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
