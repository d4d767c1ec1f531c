{{/* Names, labels and the pieces every Bastion pod shares. */}}
{{- define "bastion.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "bastion.labels" -}}
app.kubernetes.io/name: bastion
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of one component: (dict "root" $ "component" "gateway") */}}
{{- define "bastion.selector" -}}
app.kubernetes.io/name: bastion
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "bastion.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end -}}
{{- end -}}

{{- define "bastion.redisUrl" -}}
rediss://{{ .Values.redis.host }}:{{ .Values.redis.port }}/{{ .Values.redis.database }}
{{- end -}}

{{/* Pod-level security: Pod Security "restricted". */}}
{{- define "bastion.podSecurity" -}}
automountServiceAccountToken: false
serviceAccountName: {{ include "bastion.fullname" . }}
enableServiceLinks: false
securityContext:
  runAsNonRoot: true
  runAsUser: 65532
  runAsGroup: 65532
  fsGroup: 65532
  seccompProfile:
    type: RuntimeDefault
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Container-level security: Pod Security "restricted", read-only root filesystem. */}}
{{- define "bastion.containerSecurity" -}}
securityContext:
  allowPrivilegeEscalation: false
  privileged: false
  readOnlyRootFilesystem: true
  runAsNonRoot: true
  runAsUser: 65532
  runAsGroup: 65532
  capabilities:
    drop: [ALL]
  seccompProfile:
    type: RuntimeDefault
{{- end -}}

{{/* Environment shared by every role: (dict "root" $ "extra" .Values.gateway.env) */}}
{{- define "bastion.env" -}}
- name: BASTION_ENVIRONMENT
  value: production
- name: BASTION_REQUIRE_TLS
  value: "true"
- name: BASTION_REDIS_URL
  value: {{ include "bastion.redisUrl" .root | quote }}
- name: BASTION_TLS_CERT
  value: /certs/tls.crt
- name: BASTION_TLS_KEY
  value: /certs/tls.key
- name: BASTION_TLS_CA
  value: /certs/ca.crt
{{- range $k, $v := .root.Values.env }}
- name: {{ $k }}
  value: {{ $v | quote }}
{{- end }}
{{- range $k, $v := .extra }}
- name: {{ $k }}
  value: {{ $v | quote }}
{{- end }}
{{- end -}}

{{/* /tmp as a memory-backed emptyDir and the role's certificate Secret (0440: root-owned,
     group fsGroup, which libpq accepts for a key file). */}}
{{- define "bastion.volumes" -}}
- name: tmp
  emptyDir:
    medium: Memory
    sizeLimit: 256Mi
- name: certs
  secret:
    secretName: {{ .secret }}
    defaultMode: 0440
{{- end -}}

{{- define "bastion.mounts" -}}
- name: tmp
  mountPath: /tmp
- name: certs
  mountPath: /certs
  readOnly: true
{{- end -}}
