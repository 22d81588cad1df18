{{/* The name every object of the release carries. */}}
{{- define "redis-relay.fullname" -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "redis-relay.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The environment variable that carries one relay's upstream password. */}}
{{- define "redis-relay.passwordEnv" -}}
{{- printf "RELAY_%s_PASSWORD" (.name | upper | replace "-" "_") -}}
{{- end -}}
