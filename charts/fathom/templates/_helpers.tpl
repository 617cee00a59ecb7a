{{/* The release's base name: <release>-fathom, or the release name when it contains "fathom". */}}
{{- define "fathom.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "fathom.operator" -}}{{ include "fathom.fullname" . }}-operator{{- end -}}
{{- define "fathom.runner" -}}{{ include "fathom.fullname" . }}-node-runner{{- end -}}
{{- define "fathom.collector" -}}{{ include "fathom.fullname" . }}-collector{{- end -}}
{{- define "fathom.tlsSecret" -}}
{{- if .Values.collector.tls.generate -}}{{ include "fathom.fullname" . }}-collector-tls{{- else -}}{{ .Values.collector.tls.existingSecret }}{{- end -}}
{{- end -}}

{{- define "fathom.labels" -}}
app.kubernetes.io/part-of: fathom
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "fathom.image" -}}
{{- $root := index . 0 -}}{{- $name := index . 1 -}}
{{- printf "%s/%s:%s" $root.Values.images.registry $name (default $root.Chart.AppVersion $root.Values.images.tag) -}}
{{- end -}}

{{/* The ServiceAccount user name of the runner: only its tokens prove a node to the collector. */}}
{{- define "fathom.runnerUser" -}}
system:serviceaccount:{{ .Release.Namespace }}:{{ include "fathom.runner" . }}
{{- end -}}
