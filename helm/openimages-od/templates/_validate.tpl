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

{{- if and $v.prepare.enabled $v.prepare.useExistingCluster (not $v.rayCluster.enabled) }}
{{- $errors = append $errors "prepare.useExistingCluster=true submits the RayJob to the chart's RayCluster, but rayCluster.enabled=false. Set rayCluster.enabled=true or prepare.useExistingCluster=false." }}
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
