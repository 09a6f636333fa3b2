{{/*
The chart's name: `nameOverride`, or the chart name.
*/}}
{{- define "herd.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of every resource name: `fullnameOverride`, or `<release>-<name>` (the release name alone when it
already contains the name). Kept to 26 characters so that `<fullname>-<model>` (26 + 1 + a model name of at most
20) stays within KubeRay's 47-character limit on RayService names.
*/}}
{{- define "herd.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 26 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 26 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 26 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
`chart-version`, for the helm.sh/chart label.
*/}}
{{- define "herd.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels every pod of this release carries and every selector of the chart starts from. The Ray pods'
NetworkPolicy admits exactly the pods that carry these.
*/}}
{{- define "herd.selectorLabels" -}}
app.kubernetes.io/name: {{ include "herd.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Labels of every object. app.kubernetes.io/version is the version of Herd that runs: the chart's appVersion (the
same for both image flavours, which are builds of one version), or an explicit `image.tag`, which is the user's
word for what runs.
*/}}
{{- define "herd.labels" -}}
helm.sh/chart: {{ include "herd.chart" . }}
{{ include "herd.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: herd
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
The image of every container: `image.tag` as it is, or the tag `make image` gives this version in this flavour,
`<appVersion>-<image.flavor>` (herd:0.1.0-cuda).
*/}}
{{- define "herd.image" -}}
{{- $tag := .Values.image.tag | default (printf "%s-%s" .Chart.AppVersion .Values.image.flavor) }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}

{{/*
Name of the control plane's ServiceAccount.
*/}}
{{- define "herd.controlplaneServiceAccount" -}}
{{- printf "%s-controlplane" (include "herd.fullname" .) }}
{{- end }}

{{/*
Name of the control plane's Lease (leader election).
*/}}
{{- define "herd.leaseName" -}}
{{- printf "%s-controlplane" (include "herd.fullname" .) }}
{{- end }}

{{/*
Name of the claim holding the checkpoints.
*/}}
{{- define "herd.weightsClaim" -}}
{{- .Values.weights.existingClaim | default (printf "%s-weights" (include "herd.fullname" .)) }}
{{- end }}

{{/*
A map laid over another, key by key and recursively: `over` wins, whatever its value (false and 0 too, which
sprig's merge and mergeOverwrite would not let win). Returns JSON; call as
`include "herd.deepMerge" (dict "base" $a "over" $b) | fromJson`.
*/}}
{{- define "herd.deepMerge" -}}
{{- $out := deepCopy .base }}
{{- range $key, $value := .over }}
{{- $current := get $out $key }}
{{- if and (kindIs "map" $value) (kindIs "map" $current) }}
{{- $_ := set $out $key (include "herd.deepMerge" (dict "base" $current "over" $value) | fromJson) }}
{{- else }}
{{- $_ := set $out $key $value }}
{{- end }}
{{- end }}
{{- toJson $out }}
{{- end }}

{{/*
The enabled models, by name, each laid over `modelDefaults` and checked beyond what the schema can say.
Returns JSON: `include "herd.models" . | fromJson`.
*/}}
{{- define "herd.models" -}}
{{- $models := dict }}
{{- range $name, $model := .Values.models }}
{{- $m := include "herd.deepMerge" (dict "base" $.Values.modelDefaults "over" $model) | fromJson }}
{{- if $m.enabled }}
{{- $path := required (printf "models.%s.path: the checkpoint directory (relative to weights.mountPath) is required" $name) $m.path }}
{{- if and $.Values.weights.tiny.enabled (not (has $path (list "scout" "maverick"))) }}
{{- fail (printf "models.%s.path: with weights.tiny.enabled the path must be a tiny preset, scout or maverick; got %q" $name $path) }}
{{- end }}
{{- with $m.deployment.autoscaling }}
{{- if $.Values.controlplane.enabled }}
{{- fail (printf "models.%s.deployment.autoscaling: Ray Serve's autoscaling and the control plane (controlplane.enabled) would both set the replicas; use models.%s.autoscale with the control plane, or turn it off" $name $name) }}
{{- end }}
{{- if lt (int .max_replicas) (int .min_replicas) }}
{{- fail (printf "models.%s.deployment.autoscaling: max_replicas (%d) is below min_replicas (%d)" $name (int .max_replicas) (int .min_replicas)) }}
{{- end }}
{{- end }}
{{- if lt (int $m.autoscale.max_replicas) (int $m.autoscale.min_replicas) }}
{{- fail (printf "models.%s.autoscale: max_replicas (%d) is below min_replicas (%d)" $name (int $m.autoscale.max_replicas) (int $m.autoscale.min_replicas)) }}
{{- end }}
{{- $w := $m.worker }}
{{- if or (lt (int $w.maxReplicas) (int $w.minReplicas)) (lt (int $w.replicas) (int $w.minReplicas)) (gt (int $w.replicas) (int $w.maxReplicas)) }}
{{- fail (printf "models.%s.worker: needs minReplicas (%d) <= replicas (%d) <= maxReplicas (%d)" $name (int $w.minReplicas) (int $w.replicas) (int $w.maxReplicas)) }}
{{- end }}
{{- include "herd.checkReplicaFits" (dict "name" $name "model" $m) }}
{{- if and (hasPrefix "cuda" $m.engine.device) (eq $.Values.image.flavor "cpu") }}
{{- fail (printf "models.%s.engine.device: %s needs the CUDA image, but image.flavor is cpu (no CUDA torch, no CuPy); set image.flavor: cuda (make image FLAVOR=cuda), or engine.device: cpu" $name $m.engine.device) }}
{{- end }}
{{- with $m.engine.speculative }}
{{- if $m.engine.async_scheduling }}
{{- fail (printf "models.%s.engine.speculative: speculative decoding does not run with async_scheduling yet (a step's drafts come from the tokens the step before verified); set models.%s.engine.async_scheduling: false, or speculative: null" $name $name) }}
{{- end }}
{{- $lo := int (default 2 .prompt_lookup_min) }}
{{- $hi := int (default 4 .prompt_lookup_max) }}
{{- if gt $lo $hi }}
{{- fail (printf "models.%s.engine.speculative: prompt_lookup_min (%d) is above prompt_lookup_max (%d)" $name $lo $hi) }}
{{- end }}
{{- end }}
{{- with $m.disaggregation }}
{{- if $m.deployment.autoscaling }}
{{- fail (printf "models.%s.disaggregation: its pools are sized by prefill_replicas and decode_replicas; deployment.autoscaling would scale only the proxy in front of them (set it to null)" $name) }}
{{- end }}
{{- range $pool := list "prefill_autoscale" "decode_autoscale" }}
{{- with (get $m.disaggregation $pool) }}
{{- if lt (int (default 1 .max_replicas)) (int (default 1 .min_replicas)) }}
{{- fail (printf "models.%s.disaggregation.%s: max_replicas (%d) is below min_replicas (%d)" $name $pool (int (default 1 .max_replicas)) (int (default 1 .min_replicas))) }}
{{- end }}
{{- end }}
{{- end }}
{{- if not $m.engine.enable_prefix_caching }}
{{- fail (printf "models.%s.disaggregation: a decode replica takes the prompt's blocks from its prefix cache; set models.%s.engine.enable_prefix_caching: true" $name $name) }}
{{- end }}
{{- end }}
{{- if and (eq $m.shard_listen "node") (not $.Values.tls.shards.enabled) }}
{{- fail (printf "models.%s.shard_listen: node puts the expert shards on the pod's address, which needs their mutual TLS: set tls.shards.enabled and tls.shards.secretName (or keep shard_listen: loopback)" $name) }}
{{- end }}
{{- $_ := set $models $name $m }}
{{- end }}
{{- end }}
{{- if not $models }}
{{- fail "models: no model is enabled; set models.<name>.enabled: true for at least one" }}
{{- end }}
{{- toJson $models }}
{{- end }}

{{/*
A CPU quantity as a number of CPUs: 4, "4", "500m", "1.5".
*/}}
{{- define "herd.cpus" -}}
{{- $q := toString . }}
{{- if hasSuffix "m" $q }}
{{- divf (trimSuffix "m" $q | float64) 1000.0 }}
{{- else }}
{{- $q | float64 }}
{{- end }}
{{- end }}

{{/*
With STRICT_PACK a replica's placement group (trunk bundle + one bundle per shard) lands on one node, that is
one worker pod: its GPUs must fit in the pod's nvidia.com/gpu limit and its CPUs (one per bundle, the bundles of
herd.platform.replica_app:build_app) in the pod's CPU limit, or the replica never schedules.
*/}}
{{- define "herd.checkReplicaFits" -}}
{{- $d := .model.deployment }}
{{- if eq $d.placement_strategy "STRICT_PACK" }}
{{- $shards := ternary 0 (int .model.shards) (eq .model.transport "local") }}
{{- $resources := .model.worker.resources | default dict }}
{{- $limits := $resources.limits | default dict }}
{{- $requests := $resources.requests | default dict }}
{{- if $d.gpus }}
{{- $trunk := ternary 1.0 $d.trunk_gpus (kindIs "invalid" $d.trunk_gpus) }}
{{- $shard := ternary 1.0 $d.shard_gpus (kindIs "invalid" $d.shard_gpus) }}
{{- $trunks := int (.model.trunks | default 1) }}
{{- $need := addf (mulf $trunk $trunks) (mulf $shard $shards) }}
{{- $have := get $limits "nvidia.com/gpu" | default 0 | float64 }}
{{- if gt $need $have }}
{{- fail (printf "models.%s: a replica needs %v GPUs on one node (STRICT_PACK: %d trunks x %v + %d shards x %v) but a worker pod has %v (worker.resources.limits[\"nvidia.com/gpu\"])" .name $need $trunks $trunk $shards $shard $have) }}
{{- end }}
{{- end }}
{{- $cpu := get $limits "cpu" | default (get $requests "cpu") }}
{{- if $cpu }}
{{- $haveCpus := include "herd.cpus" $cpu | float64 }}
{{- if gt (add1 $shards | float64) $haveCpus }}
{{- fail (printf "models.%s: a replica needs %d CPUs on one node (STRICT_PACK: 1 for the trunk + 1 per shard) but a worker pod has %v (worker.resources.limits.cpu)" .name (add1 $shards) $haveCpus) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The RayService of a model: `<fullname>-<model>`.
*/}}
{{- define "herd.rayServiceName" -}}
{{- printf "%s-%s" (include "herd.fullname" .root) .name }}
{{- end }}

{{/*
The chart's Service in front of Serve's gRPC proxies of a model: `<rayservice>-serve-grpc`. KubeRay's own
`<rayservice>-serve-svc` carries only the port named `serve` (HTTP), so the gateway dials this one.
*/}}
{{- define "herd.serveGrpcService" -}}
{{- printf "%s-serve-grpc" (include "herd.rayServiceName" .) }}
{{- end }}

{{/*
Port of Serve's gRPC proxy on every Ray node (grpc_options.port of the Serve config).
*/}}
{{- define "herd.serveGrpcPort" -}}
9000
{{- end }}

{{/*
Environment of every herd container: caches that would go under $HOME, on the read-only root filesystem
otherwise, go to the writable /tmp.
*/}}
{{- define "herd.cacheEnv" -}}
- name: XDG_CACHE_HOME
  value: /tmp/.cache
- name: CUPY_CACHE_DIR
  value: /tmp/.cupy/kernel_cache
{{- end }}

{{/*
The checkpoint directory of a model as the pods see it.
*/}}
{{- define "herd.modelPath" -}}
{{- printf "%s/%s" (.root.Values.weights.mountPath | trimSuffix "/") .model.path }}
{{- end }}

{{/*
The telemetry settings every herd process reads, as JSON: `telemetry` as it is, with replica_metrics_port kept
when it is null (off), which Helm would otherwise drop from a profile's values.
*/}}
{{- define "herd.telemetry" -}}
{{- merge (dict "replica_metrics_port" .Values.telemetry.replica_metrics_port) .Values.telemetry | toJson }}
{{- end }}

{{/*
A model's settings that its replicas read (herd.workers.replica_config.ReplicaConfig), as JSON: the model's
values passed through unchanged, less what only the chart, the gateway and the control plane read, with its name
and its path as the pods mount it. A replica setting added to ReplicaConfig needs only its value here.
*/}}
{{- define "herd.replicaConfig" -}}
{{- $config := omit .model "enabled" "head" "worker" "autoscale" "cold_start_wait_s" "cold_start_retry_after_s" }}
{{- with .model.disaggregation }}
{{- $_ := set $config "disaggregation" (omit . "prefill_autoscale" "decode_autoscale") }}
{{- end }}
{{- $_ := set $config "name" .name }}
{{- $_ := set $config "path" (include "herd.modelPath" .) }}
{{- toJson $config }}
{{- end }}

{{/*
Where the Ray pods mount the shards' TLS Secret (tls.shards.secretName).
*/}}
{{- define "herd.shardTlsDir" -}}
/etc/herd/shard-tls
{{- end }}

{{/*
The shards' mutual TLS as a replica reads it (herd.workers.shard_tls.ShardTls: the files of the mounted Secret),
as JSON; {} when tls.shards is off. herd serve writes the same from herd's tls.shard_* settings.
*/}}
{{- define "herd.shardTls" -}}
{{- $tls := .Values.tls.shards }}
{{- if $tls.enabled }}
{{- $_ := required "tls.shards.secretName: the Secret with the shards' tls.crt, tls.key and ca.crt is required when tls.shards.enabled" $tls.secretName }}
{{- $dir := include "herd.shardTlsDir" . }}
{{- $out := dict "cert_file" (printf "%s/tls.crt" $dir) "key_file" (printf "%s/tls.key" $dir) "ca_file" (printf "%s/ca.crt" $dir) }}
{{- with $tls.serverName }}
{{- $_ := set $out "server_name" . }}
{{- end }}
{{- toJson $out }}
{{- else }}
{{- toJson dict }}
{{- end }}
{{- end }}

{{/*
A pod's terminationGracePeriodSeconds: its process's shutdown budget in seconds, rounded up, plus
terminationGraceMarginSeconds. Takes (dict "root" $ "budget" seconds).
*/}}
{{- define "herd.graceSeconds" -}}
{{- add (ceil (float64 .budget) | int) (int .root.Values.terminationGraceMarginSeconds) }}
{{- end }}

{{/*
The Ray Serve config of one model: exactly `herd serve --print-config` (herd.platform.server.serve_config), in
the same key order; the args are herd.workers.replica_config.ReplicaArgs, which
herd.platform.replica_app:build_app takes: the replica config and the telemetry settings.
*/}}
{{- define "herd.serveConfig" -}}
{{- $args := include "herd.replicaConfig" . | fromJson }}
{{- $_ := set $args "telemetry" (include "herd.telemetry" .root | fromJson) -}}
{{- with (include "herd.shardTls" .root | fromJson) }}
{{- $_ := set $args "shard_tls" . }}
{{- end -}}
proxy_location: EveryNode
grpc_options:
  port: {{ include "herd.serveGrpcPort" . }}
  grpc_servicer_functions:
  - herd.protos.herd.v1.inference_pb2_grpc.add_InferenceServicer_to_server
applications:
- name: {{ .name | toJson }}
  route_prefix: {{ printf "/%s" .name | toJson }}
  import_path: herd.platform.replica_app:build_app
  args:
    {{- toYaml $args | nindent 4 }}
{{- end }}

{{/*
Volumes every herd pod has: a writable /tmp, and the model weights (a claim, or an emptyDir the tiny
checkpoints are made in). The /tmp/ray emptyDir is named `ray-logs` on purpose: KubeRay shares a volume of
that name with its autoscaler sidecar and, finding it, adds none of its own.
*/}}
{{- define "herd.tmpVolume" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpSizeLimit }}
{{- end }}

{{- define "herd.weightsVolume" -}}
- name: weights
{{- if .Values.weights.tiny.enabled }}
  emptyDir:
    sizeLimit: 1Gi
{{- else }}
  persistentVolumeClaim:
    claimName: {{ include "herd.weightsClaim" . }}
    readOnly: true
{{- end }}
{{- end }}

{{- define "herd.weightsMount" -}}
- name: weights
  mountPath: {{ .Values.weights.mountPath }}
  readOnly: true
{{- end }}

{{/*
Init containers of the pods that read checkpoints, when weights.tiny.enabled: `herd make-tiny` for each enabled
model, with one seed, so every pod holds the same files (the gateway's tokenizer matches the replicas').
Takes (dict "root" $ "models" $models).
*/}}
{{- define "herd.tinyInitContainers" -}}
{{- $root := .root }}
{{- if $root.Values.weights.tiny.enabled }}
{{- range $name, $m := .models }}
- name: make-tiny-{{ $name }}
  image: {{ include "herd.image" $root }}
  imagePullPolicy: {{ $root.Values.image.pullPolicy }}
  command: ["herd", "make-tiny", "--preset", {{ $m.path | quote }}, "--out", {{ include "herd.modelPath" (dict "root" $root "model" $m) | quote }}, "--seed", {{ $root.Values.weights.tiny.seed | int | quote }}]
  env:
    {{- include "herd.cacheEnv" $root | nindent 4 }}
  securityContext:
    {{- toYaml $root.Values.containerSecurityContext | nindent 4 }}
  volumeMounts:
    - name: weights
      mountPath: {{ $root.Values.weights.mountPath }}
    - name: tmp
      mountPath: /tmp
{{- end }}
{{- end }}
{{- end }}

{{/*
The pod spec of a Ray head or worker: the herd image, non-root with a read-only root filesystem, /tmp and
/tmp/ray writable, the weights read-only. KubeRay adds the `ray start` command and a /dev/shm emptyDir sized
from the memory request. The grace period holds the model's drain_timeout_s; with tls.shards the shards' Secret is
mounted read-only. Takes (dict "root" $ "models" {name: model} "model" model "group" head|worker "container" name).
*/}}
{{- define "herd.rayPodSpec" -}}
{{- $root := .root }}
{{- $values := $root.Values }}
{{- with $values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml $values.podSecurityContext | nindent 2 }}
terminationGracePeriodSeconds: {{ include "herd.graceSeconds" (dict "root" $root "budget" .model.drain_timeout_s) }}
{{- with (include "herd.tinyInitContainers" (dict "root" $root "models" .models) | trim) }}
initContainers:
  {{- . | nindent 2 }}
{{- end }}
containers:
  - name: {{ .container }}
    image: {{ include "herd.image" $root }}
    imagePullPolicy: {{ $values.image.pullPolicy }}
    ports:
      {{- if eq .container "ray-head" }}
      - name: gcs-server
        containerPort: 6379
      - name: dashboard
        containerPort: 8265
      - name: client
        containerPort: 10001
      - name: metrics
        containerPort: 8080
      - name: serve
        containerPort: 8000
      {{- end }}
      # Serve's gRPC proxy (every node runs one); the gateway reaches it through <rayservice>-serve-grpc.
      - name: serve-grpc
        containerPort: {{ include "herd.serveGrpcPort" . }}
      {{- if not (kindIs "invalid" $values.telemetry.replica_metrics_port) }}
      # Prometheus /metrics of the model replica placed on this pod (docs/METRICS.md).
      - name: replica-metrics
        containerPort: {{ $values.telemetry.replica_metrics_port }}
      {{- end }}
    env:
      {{- include "herd.cacheEnv" . | nindent 6 }}
      {{- with $values.ray.extraEnv }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
    resources:
      {{- toYaml .group.resources | nindent 6 }}
    securityContext:
      {{- toYaml $values.containerSecurityContext | nindent 6 }}
    volumeMounts:
      - name: tmp
        mountPath: /tmp
      - name: ray-logs
        mountPath: /tmp/ray
      {{- include "herd.weightsMount" $root | nindent 6 }}
      {{- if $values.tls.shards.enabled }}
      - name: shard-tls
        mountPath: {{ include "herd.shardTlsDir" $root }}
        readOnly: true
      {{- end }}
volumes:
  {{- include "herd.tmpVolume" $root | nindent 2 }}
  - name: ray-logs
    emptyDir:
      sizeLimit: {{ $values.tmpSizeLimit }}
  {{- include "herd.weightsVolume" $root | nindent 2 }}
  {{- if $values.tls.shards.enabled }}
  - name: shard-tls
    secret:
      secretName: {{ $values.tls.shards.secretName }}
      defaultMode: 0440
  {{- end }}
{{- with .group.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .group.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .group.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
