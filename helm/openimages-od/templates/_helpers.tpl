{{/*
Names, labels and the pod pieces every component shares.
*/}}

{{- define "oiod.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "oiod.fullname" -}}
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

{{/*
Name of one component's objects: include "oiod.componentName" (list . "serve").
*/}}
{{- define "oiod.componentName" -}}
{{- $root := index . 0 }}
{{- printf "%s-%s" (include "oiod.fullname" $root | trunc 40 | trimSuffix "-") (index . 1) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Job names carry the runId. Indexed Job pods are named <job>-<index> and that is
also their hostname (63 characters at most), so leave room for the index.
*/}}
{{- define "oiod.jobName" -}}
{{- $root := index . 0 }}
{{- printf "%s-%s-%s" (include "oiod.fullname" $root | trunc 30 | trimSuffix "-") (index . 1) (index . 2) | trunc 56 | trimSuffix "-" }}
{{- end }}

{{/*
KubeRay rejects RayJob names longer than 47 characters (it appends a suffix
for the cluster it creates).
*/}}
{{- define "oiod.rayJobName" -}}
{{- printf "%s-prepare-%s" (include "oiod.fullname" . | trunc 30 | trimSuffix "-") .Values.prepare.runId | trunc 47 | trimSuffix "-" }}
{{- end }}

{{- define "oiod.rayClusterName" -}}
{{- include "oiod.componentName" (list . "ray") }}
{{- end }}

{{- define "oiod.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "oiod.selectorLabels" -}}
app.kubernetes.io/name: {{ include "oiod.name" . }}
app.kubernetes.io/instance: {{ .Release.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "oiod.labels" -}}
helm.sh/chart: {{ include "oiod.chart" . }}
{{ include "oiod.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: openimages-od
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels of one component: include "oiod.componentLabels" (list . "serve") */}}
{{- define "oiod.componentLabels" -}}
{{ include "oiod.labels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/*
Labels of a pod template. No chart or app version here: Job pod templates are
immutable, so a version label would make `helm upgrade` after a chart bump
fail on every existing Job (and roll every Deployment for nothing).
include "oiod.podLabels" (list . "serve")
*/}}
{{- define "oiod.podLabels" -}}
{{ include "oiod.selectorLabels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
app.kubernetes.io/part-of: openimages-od
{{- with (index . 0).Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Pod metadata: labels and the component's podAnnotations (plus extra ones).
include "oiod.podMetadata" (dict "root" . "component" "serve" "values" .Values.serve "annotations" (dict ...))
*/}}
{{- define "oiod.podMetadata" -}}
labels:
  {{- include "oiod.podLabels" (list .root .component) | nindent 2 }}
  {{- with .extraLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- $ann := merge (dict) (default dict .annotations) (default dict .values.podAnnotations) }}
{{- with $ann }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
Scheduling fields of a pod spec from a component's values.
include "oiod.scheduling" .Values.serve
*/}}
{{- define "oiod.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- end }}

{{- define "oiod.componentSelectorLabels" -}}
{{ include "oiod.selectorLabels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/*
ServiceAccount of one component: include "oiod.serviceAccountName" (list . "serve").
One account per component, so a cloud role (IRSA, Workload Identity) or a
RoleBinding given to one of them reaches nobody else.
*/}}
{{- define "oiod.serviceAccountName" -}}
{{- $root := index . 0 }}
{{- if $root.Values.serviceAccount.create }}
{{- include "oiod.componentName" (list $root (index . 1)) }}
{{- else }}
{{- default "default" $root.Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "oiod.configMapName" -}}
{{- include "oiod.componentName" (list . "config") }}
{{- end }}

{{- define "oiod.s3SecretName" -}}
{{- if .Values.objectStore.existingSecret }}
{{- .Values.objectStore.existingSecret }}
{{- else }}
{{- include "oiod.componentName" (list . "s3") }}
{{- end }}
{{- end }}

{{- define "oiod.modelClaimName" -}}
{{- default (include "oiod.componentName" (list . "models")) .Values.modelStorage.existingClaim }}
{{- end }}

{{/* include "oiod.image" (list . .Values.images.serve) */}}
{{- define "oiod.image" -}}
{{- $root := index . 0 }}
{{- $img := index . 1 }}
{{- printf "%s:%s" $img.repository (default $root.Chart.AppVersion $img.tag) }}
{{- end }}

{{- define "oiod.trainImage" -}}
{{- include "oiod.image" (list . .Values.images.train) }}
{{- end }}

{{/*
TensorBoard reads the model directory straight from the filesystem.
*/}}
{{- define "oiod.tensorboardLogdir" -}}
{{- $cfgTrain := default dict .Values.config.train }}
{{- $dir := default (get $cfgTrain "model_dir") .Values.tensorboard.logdir }}
{{- $dir = toString (default "" $dir) }}
{{- trimPrefix "file://" $dir }}
{{- end }}

{{- define "oiod.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurity.runAsUser }}
runAsGroup: {{ .Values.podSecurity.runAsGroup }}
fsGroup: {{ .Values.podSecurity.fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "oiod.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurity.runAsUser }}
runAsGroup: {{ .Values.podSecurity.runAsGroup }}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "oiod.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Environment of every oiod container: object-store endpoint, region, keys.
*/}}
{{- define "oiod.env" -}}
{{- include "oiod.baseEnv" . }}
{{- include "oiod.credentialsEnv" . }}
{{- end }}

{{/* The environment without the object-store keys (TensorBoard reads only the volume). */}}
{{- define "oiod.baseEnv" -}}
- name: OIOD_CONFIG
  value: /etc/oiod/config.yaml
- name: HOME
  value: /home/oiod
- name: MPLCONFIGDIR
  value: /tmp/matplotlib
{{- with .Values.objectStore.endpoint }}
- name: OIOD_S3_ENDPOINT
  value: {{ . | quote }}
{{- if $.Values.objectStore.setAwsEndpointUrl }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- end }}
{{- with .Values.objectStore.region }}
- name: AWS_REGION
  value: {{ . | quote }}
- name: AWS_DEFAULT_REGION
  value: {{ . | quote }}
{{- end }}
{{- end }}

{{/*
The object-store keys, from the Secret only: Ray workers get them here, in
their pod environment, never through a Ray runtime_env (which the dashboard
shows to whoever can reach it).
*/}}
{{- define "oiod.credentialsEnv" -}}
{{- if or .Values.objectStore.existingSecret .Values.objectStore.createSecret.enabled }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ include "oiod.s3SecretName" . }}
      key: {{ .Values.objectStore.accessKeyIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "oiod.s3SecretName" . }}
      key: {{ .Values.objectStore.secretAccessKeyKey }}
{{- end }}
{{- end }}

{{/*
Volumes of every oiod pod. The root filesystem is read-only, so /tmp and the
home directory (caches: ~/.cache, ~/.keras, ~/.config, ~/.ray) are emptyDirs.
include "oiod.volumes" (dict "root" . "models" true "shm" "2Gi")
*/}}
{{- define "oiod.volumes" -}}
{{- $root := .root }}
- name: config
  configMap:
    name: {{ include "oiod.configMapName" $root }}
- name: tmp
  emptyDir: {}
- name: home
  emptyDir: {}
{{- with .shm }}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ . }}
{{- end }}
{{- if and .models $root.Values.modelStorage.enabled }}
- name: models
  persistentVolumeClaim:
    claimName: {{ include "oiod.modelClaimName" $root }}
{{- end }}
{{- end }}

{{- define "oiod.volumeMounts" -}}
{{- $root := .root }}
- name: config
  mountPath: /etc/oiod
  readOnly: true
- name: tmp
  mountPath: /tmp
- name: home
  mountPath: /home/oiod
{{- if .shm }}
- name: dshm
  mountPath: /dev/shm
{{- end }}
{{- if and .models $root.Values.modelStorage.enabled }}
- name: models
  mountPath: {{ $root.Values.modelStorage.mountPath }}
{{- end }}
{{- end }}

{{/* " --a --b" from a list of CLI arguments (the schema forbids shell metacharacters). */}}
{{- define "oiod.extraArgs" -}}
{{- range . }} {{ . }}{{- end }}
{{- end }}

{{/*
The exact command the prepare RayJob runs; NOTES.txt and the tests read it too.
*/}}
{{- define "oiod.prepareEntrypoint" -}}
oiod prepare -c /etc/oiod/config.yaml{{ include "oiod.autoscaleArgs" . }}{{ include "oiod.extraArgs" .Values.prepare.extraArgs }}
{{- end }}

{{/*
CPUs Ray sees on one download worker: `num-cpus` from rayStartParams, else
the container's CPU limit (what KubeRay passes to `ray start`), else its
request. "1500m" counts as 1.5.
*/}}
{{- define "oiod.downloadWorkerCpus" -}}
{{- $d := .Values.ray.download }}
{{- $cpu := "" }}
{{- if hasKey $d.rayStartParams "num-cpus" }}
{{- $cpu = toString (get $d.rayStartParams "num-cpus") }}
{{- else }}
{{- $res := default dict $d.resources }}
{{- $cpu = toString (default (get (default dict $res.requests) "cpu") (get (default dict $res.limits) "cpu")) }}
{{- end }}
{{- if hasSuffix "m" $cpu }}
{{- divf (float64 (trimSuffix "m" $cpu)) 1000.0 }}
{{- else }}
{{- float64 (default "0" $cpu) }}
{{- end }}
{{- end }}

{{/*
With the in-tree autoscaler, prepare asks for as many actors as maxReplicas
workers can hold: those that do not fit yet stay pending, and pending
resource demand is what makes the autoscaler add workers. Without it the
actors follow the workers that exist (no argument). An explicit
config.ray.num_actors wins either way.
*/}}
{{- define "oiod.autoscaleArgs" -}}
{{- $v := .Values }}
{{- $cfgRay := default dict $v.config.ray }}
{{- if and $v.ray.enableInTreeAutoscaling (not (hasKey $cfgRay "num_actors")) }}
{{- $perActor := float64 (default 0.5 (get $cfgRay "num_cpus_per_actor")) }}
{{- $perWorker := float64 (include "oiod.downloadWorkerCpus" .) }}
{{- $actors := mul (int $v.ray.download.maxReplicas) (int (floor (divf $perWorker $perActor))) }}
{{- if gt (int $actors) 0 }} --set ray.num_actors={{ $actors }}{{ end }}
{{- end }}
{{- end }}

{{/*
GPU resources merged into a container's resources:
include "oiod.resources" (dict "resources" .Values.train.resources "gpus" 1 "gpuName" "nvidia.com/gpu")
*/}}
{{- define "oiod.resources" -}}
{{- $res := deepCopy (default dict .resources) }}
{{- if gt (int .gpus) 0 }}
{{- $req := default dict (get $res "requests") }}
{{- $lim := default dict (get $res "limits") }}
{{- $_ := set $req .gpuName (int .gpus) }}
{{- $_ := set $lim .gpuName (int .gpus) }}
{{- $_ := set $res "requests" $req }}
{{- $_ := set $res "limits" $lim }}
{{- end }}
{{- toYaml $res }}
{{- end }}
