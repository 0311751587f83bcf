{{/*
Cross-field rules the JSON schema cannot express. Each failure names the
values involved and what to change. Called once from configmap.yaml.
*/}}
{{- define "oiod.validate" -}}
{{- $v := .Values }}
{{- $errors := list }}

{{- if and $v.prepare.enabled (not $v.kuberay.rayJobSupport) }}
{{- $errors = append $errors "prepare.enabled=true renders a KubeRay RayJob, but kuberay.rayJobSupport=false says the cluster's KubeRay operator cannot run RayJobs. Install or upgrade the kuberay-operator chart (see README.md, Prerequisites) and set kuberay.rayJobSupport=true, or set prepare.enabled=false." }}
{{- end }}

{{- if and $v.prepare.enabled $v.prepare.useExistingCluster (not $v.rayCluster.enabled) (not $v.prepare.clusterName) }}
{{- $errors = append $errors "prepare.useExistingCluster=true submits the RayJob to the chart's RayCluster, but rayCluster.enabled=false. Set rayCluster.enabled=true, name another cluster in prepare.clusterName, or set prepare.useExistingCluster=false." }}
{{- end }}
{{- if and $v.prepare.clusterName (not $v.prepare.useExistingCluster) }}
{{- $errors = append $errors (printf "prepare.clusterName=%s only applies with prepare.useExistingCluster=true." $v.prepare.clusterName) }}
{{- end }}

{{- /* KubeRay operator validation (ray-operator/controllers/ray/utils/validation.go, KubeRay 1.5-1.6): what it rejects makes the RayJob/RayCluster go to ValidationFailed, which no schema shows. */}}
{{- if or $v.prepare.enabled $v.rayCluster.enabled }}
{{- $names := list }}
{{- if $v.rayCluster.enabled }}{{ $names = append $names (list "RayCluster" (include "oiod.rayClusterName" .) 63) }}{{ end }}
{{- if $v.prepare.enabled }}{{ $names = append $names (list "RayJob" (include "oiod.rayJobName" .) 47) }}{{ end }}
{{- range $names }}
{{- if not (regexMatch "^[a-z]([-a-z0-9]*[a-z0-9])?$" (index . 1)) }}
{{- $errors = append $errors (printf "%s name %q is not a DNS-1035 label (must start with a letter; KubeRay rejects it): use a release name that starts with a letter or set fullnameOverride." (index . 0) (index . 1)) }}
{{- else if gt (len (index . 1)) (index . 2) }}
{{- $errors = append $errors (printf "%s name %q is longer than KubeRay's limit of %d characters: shorten fullnameOverride." (index . 0) (index . 1) (index . 2)) }}
{{- end }}
{{- end }}
{{- range $group := list "head" "download" }}
{{- $params := (get $v.ray $group).rayStartParams }}
{{- if hasKey $params "labels" }}
{{- $errors = append $errors (printf "ray.%s.rayStartParams.labels is rejected by KubeRay (it wants the group's top-level labels field); remove it." $group) }}
{{- end }}
{{- if hasKey $params "redis-username" }}
{{- $errors = append $errors (printf "ray.%s.rayStartParams.redis-username is rejected by KubeRay (only GcsFaultToleranceOptions may set it); remove it." $group) }}
{{- end }}
{{- end }}
{{- if eq $v.ray.auth.mode "token" }}
{{- if not (semverCompare ">=2.52.0-0" $v.ray.rayVersion) }}
{{- $errors = append $errors (printf "ray.auth.mode=token needs Ray >= 2.52.0 (KubeRay refuses authOptions otherwise), but ray.rayVersion is %s. Use a newer worker image and rayVersion." $v.ray.rayVersion) }}
{{- end }}
{{- else if not $v.networkPolicy.enabled }}
{{- $errors = append $errors "ray.auth.mode=disabled with networkPolicy.enabled=false leaves the Ray dashboard and job API open to every pod in the cluster (anyone reaching it runs code with the object-store keys). Keep ray.auth.mode=token, or enable networkPolicy." }}
{{- end }}
{{- end }}
{{- /* ttlSecondsAfterFinished without shutdownAfterJobFinishes, and backoffLimit with clusterSelector, are
     rejected by KubeRay too: templates/rayjob.yaml leaves them out in those cases instead of failing. */}}

{{- $cfgRay := default dict $v.config.ray }}
{{- if and $v.prepare.enabled (hasKey $cfgRay "forward_env") }}
{{- range (get $cfgRay "forward_env") }}
{{- if regexMatch "(?i)(SECRET|TOKEN|PASSWORD|ACCESS_KEY|CREDENTIAL|SESSION)" . }}
{{- $errors = append $errors (printf "config.ray.forward_env lists %s: forwarded variables travel in the Ray runtime_env, which the dashboard shows. Ray pods already get the object-store keys from the Secret in their environment; pass other secrets the same way (see the chart README, Secrets)." .) }}
{{- end }}
{{- end }}
{{- end }}

{{- $d := $v.ray.download }}
{{- if gt (int $d.minReplicas) (int $d.maxReplicas) }}
{{- $errors = append $errors (printf "ray.download.minReplicas (%d) must be <= ray.download.maxReplicas (%d)." (int $d.minReplicas) (int $d.maxReplicas)) }}
{{- else if or (lt (int $d.replicas) (int $d.minReplicas)) (gt (int $d.replicas) (int $d.maxReplicas)) }}
{{- $errors = append $errors (printf "ray.download.replicas (%d) must lie between ray.download.minReplicas (%d) and ray.download.maxReplicas (%d)." (int $d.replicas) (int $d.minReplicas) (int $d.maxReplicas)) }}
{{- end }}

{{- $needsTrainImage := list }}
{{- range $c := list "train" "evaluate" "export" "tensorboard" }}
{{- if (get $v $c).enabled }}
{{- $needsTrainImage = append $needsTrainImage (printf "%s.enabled" $c) }}
{{- end }}
{{- end }}
{{- if not $v.images.train.repository }}
{{- if and $v.train.enabled (gt (int $v.train.gpusPerWorker) 0) }}
{{- $errors = append $errors (printf "train.gpusPerWorker=%d requests GPUs (%s) but images.train.repository is empty: build docker/Dockerfile.train (TensorFlow with CUDA + Model Garden), push it and set images.train.repository (and images.train.tag)." (int $v.train.gpusPerWorker) $v.train.gpuResourceName) }}
{{- else if $needsTrainImage }}
{{- $errors = append $errors (printf "%s need(s) the TensorFlow image but images.train.repository is empty: build docker/Dockerfile.train and set images.train.repository." (join ", " $needsTrainImage)) }}
{{- end }}
{{- end }}

{{- if and $v.train.enabled (gt (int $v.train.workers) 1) (not $v.train.indexedJob) }}
{{- $errors = append $errors (printf "train.workers=%d asks for multi-worker training, which this chart only runs as an Indexed Job with a headless Service (TF_CONFIG from OIOD_* env); train.indexedJob=false is not supported with more than one worker. Set train.indexedJob=true or train.workers=1." (int $v.train.workers)) }}
{{- end }}

{{- $a := $v.serve.autoscaling }}
{{- if and $v.serve.enabled $a.enabled (gt (int $a.minReplicas) (int $a.maxReplicas)) }}
{{- $errors = append $errors (printf "serve.autoscaling.minReplicas (%d) must be <= serve.autoscaling.maxReplicas (%d)." (int $a.minReplicas) (int $a.maxReplicas)) }}
{{- end }}

{{- $o := $v.objectStore }}
{{- if and $o.existingSecret $o.createSecret.enabled }}
{{- $errors = append $errors (printf "objectStore.existingSecret (%s) and objectStore.createSecret.enabled=true are exclusive: use the existing Secret or let the chart create one." $o.existingSecret) }}
{{- end }}
{{- if and $o.createSecret.enabled (or (not $o.createSecret.accessKeyId) (not $o.createSecret.secretAccessKey)) }}
{{- $errors = append $errors "objectStore.createSecret.enabled=true needs objectStore.createSecret.accessKeyId and objectStore.createSecret.secretAccessKey (or use objectStore.existingSecret)." }}
{{- end }}

{{- if $v.tensorboard.enabled }}
{{- $logdir := include "oiod.tensorboardLogdir" . }}
{{- if not $logdir }}
{{- $errors = append $errors "tensorboard.enabled=true needs a filesystem log directory: set config.train.model_dir to a path under modelStorage.mountPath (with modelStorage.enabled=true) or set tensorboard.logdir." }}
{{- else if regexMatch "^[a-zA-Z][a-zA-Z0-9+.-]*://" $logdir }}
{{- $errors = append $errors (printf "tensorboard log directory %q is not a filesystem path: TensorFlow 2.21 cannot read s3:// (no tensorflow-io). Put config.train.model_dir on the shared volume (modelStorage.enabled=true) or set tensorboard.logdir." $logdir) }}
{{- else if and (not $v.modelStorage.enabled) (not $v.tensorboard.logdir) }}
{{- $errors = append $errors (printf "tensorboard.enabled=true reads config.train.model_dir (%s) from a shared volume, but modelStorage.enabled=false." $logdir) }}
{{- end }}
{{- end }}

{{- if $errors }}
{{- fail (printf "\n\nopenimages-od: invalid values:\n  - %s\n" (join "\n  - " $errors)) }}
{{- end }}
{{- end }}
