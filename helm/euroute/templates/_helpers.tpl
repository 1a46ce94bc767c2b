{{/*
Expand the name of the chart.
*/}}
{{- define "euroute.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Create a default fully qualified app name.
Truncated at 63 chars because some Kubernetes name fields are limited to this
(by the DNS naming spec). If the release name contains the chart name it is used
as the full name.
*/}}
{{- define "euroute.fullname" -}}
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
Create chart name and version as used by the chart label.
*/}}
{{- define "euroute.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels.
*/}}
{{- define "euroute.labels" -}}
helm.sh/chart: {{ include "euroute.chart" . }}
{{ include "euroute.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: euroute
{{- end }}

{{/*
Selector labels shared by every pod of the release (server and migration Job).
*/}}
{{- define "euroute.selectorLabels" -}}
app.kubernetes.io/name: {{ include "euroute.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Selector labels of the server pods only. The component label keeps the migration
Job's pod out of the Service, the PDB, the HPA and the ServiceMonitor.
*/}}
{{- define "euroute.serverSelectorLabels" -}}
{{ include "euroute.selectorLabels" . }}
app.kubernetes.io/component: server
{{- end }}

{{/*
Name of the ServiceAccount used by the server pods.
*/}}
{{- define "euroute.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "euroute.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Name of the ServiceAccount used by the migration Job. The Job is a pre-install
hook and runs before the chart's own ServiceAccount exists.
*/}}
{{- define "euroute.migrationServiceAccountName" -}}
{{- if .Values.migration.serviceAccountName }}
{{- .Values.migration.serviceAccountName }}
{{- else if and (not .Values.serviceAccount.create) .Values.serviceAccount.name }}
{{- .Values.serviceAccount.name }}
{{- else }}
{{- "default" }}
{{- end }}
{{- end }}

{{/*
Name of the migration Job.
*/}}
{{- define "euroute.migrationJobName" -}}
{{- printf "%s-migrate" (include "euroute.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Container image reference: repository@digest, or repository:tag (tag defaults
to the chart appVersion).
*/}}
{{- define "euroute.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag | toString) }}
{{- end }}
{{- end }}

{{/*
Name of the ConfigMap holding the policy files.
*/}}
{{- define "euroute.policiesConfigMapName" -}}
{{- if .Values.policies.existingConfigMap }}
{{- .Values.policies.existingConfigMap }}
{{- else }}
{{- printf "%s-policies" (include "euroute.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/*
Directory the policies are mounted at (EUROUTE_POLICY_DIR).
*/}}
{{- define "euroute.policyDir" -}}
/etc/euroute/policies
{{- end }}

{{/*
Validate the values that the schema cannot express; fail with a clear message.
*/}}
{{- define "euroute.validateValues" -}}
{{- $errors := list }}
{{- if not .Values.database.existingSecret }}
{{- $errors = append $errors "database.existingSecret is required: create a Secret holding the PostgreSQL URL (key database.secretKey, default \"database-url\"), e.g. kubectl create secret generic euroute-db --from-literal=database-url='postgresql+asyncpg://user:pass@host:5432/euroute', and set database.existingSecret=euroute-db. The URL is never taken from plain values." }}
{{- end }}
{{- $hasFiles := gt (len (default (dict) .Values.policies.files)) 0 }}
{{- if and $hasFiles .Values.policies.existingConfigMap }}
{{- $errors = append $errors "policies.files and policies.existingConfigMap are mutually exclusive: set only one." }}
{{- end }}
{{- if and .Values.preStop.enabled (ge (int .Values.preStop.sleepSeconds) (int .Values.terminationGracePeriodSeconds)) }}
{{- $errors = append $errors "preStop.sleepSeconds must be lower than terminationGracePeriodSeconds, or the app gets no time to flush its ledger queue on SIGTERM." }}
{{- end }}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- $errors = append $errors "autoscaling.minReplicas must not exceed autoscaling.maxReplicas." }}
{{- end }}
{{- if and .Values.autoscaling.enabled (not .Values.autoscaling.targetCPUUtilizationPercentage) (not .Values.autoscaling.targetMemoryUtilizationPercentage) }}
{{- $errors = append $errors "autoscaling.enabled needs autoscaling.targetCPUUtilizationPercentage or autoscaling.targetMemoryUtilizationPercentage." }}
{{- end }}
{{- if $errors }}
{{- fail (printf "\n\neuroute: invalid values:\n  - %s\n" (join "\n  - " $errors)) }}
{{- end }}
{{- end }}

{{/*
Environment shared by the server and the migration Job.
*/}}
{{- define "euroute.commonEnv" -}}
- name: EUROUTE_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.database.existingSecret | quote }}
      key: {{ .Values.database.secretKey | quote }}
- name: EUROUTE_LOG_LEVEL
  value: {{ .Values.logLevel | quote }}
- name: EUROUTE_MIGRATE_ON_START
  value: "false"
- name: PYTHONUNBUFFERED
  value: "1"
- name: PYTHONDONTWRITEBYTECODE
  value: "1"
{{- end }}

{{/*
Shared rate-limit windows in Redis (server only): the URL from a Secret, keys prefixed per
release so that several releases can share one Redis.
*/}}
{{- define "euroute.redisEnv" -}}
{{- if .Values.redis.existingSecret }}
- name: EUROUTE_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.existingSecret | quote }}
      key: {{ .Values.redis.secretKey | quote }}
- name: EUROUTE_REDIS_PREFIX
  value: {{ default (printf "%s/%s:" .Release.Namespace (include "euroute.fullname" .)) .Values.redis.keyPrefix | quote }}
{{- end }}
{{- end }}

{{/*
Pod and container settings shared by the server, the migration Job and the purge CronJob.
*/}}
{{- define "euroute.podCommon" -}}
automountServiceAccountToken: false
enableServiceLinks: false
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .Values.podSecurityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
Volume and mount for /tmp (the root filesystem is read-only).
*/}}
{{- define "euroute.tmpVolume" -}}
{{- $emptyDir := dict }}
{{- with .Values.tmpVolume.medium }}
{{- $_ := set $emptyDir "medium" . }}
{{- end }}
{{- with .Values.tmpVolume.sizeLimit }}
{{- $_ := set $emptyDir "sizeLimit" . }}
{{- end -}}
- name: tmp
  emptyDir: {{- toYaml $emptyDir | nindent 4 }}
{{- end }}
