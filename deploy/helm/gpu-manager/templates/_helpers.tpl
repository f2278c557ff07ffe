{{/* Common labels. */}}
{{- define "gm.labels" -}}
app.kubernetes.io/part-of: gpu-manager
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | quote }}
{{- end -}}

{{- define "gm.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "gm.admissionService" -}}gpu-admission{{- end -}}

{{- define "gm.excludedNamespaces" -}}
{{- $ns := list "kube-system" .Release.Namespace -}}
{{- range .Values.gpuAdmission.webhook.extraExcludedNamespaces }}{{ $ns = append $ns . }}{{ end -}}
{{- uniq $ns | toJson -}}
{{- end -}}

{{- define "gm.webhookRules" }}
      - apiGroups: [""]
        apiVersions: [v1]
        operations: [CREATE, UPDATE]
        resources: [pods]
        scope: Namespaced
      - apiGroups: [apps]
        apiVersions: [v1]
        operations: [CREATE, UPDATE]
        resources: [deployments, statefulsets, daemonsets, replicasets]
        scope: Namespaced
      - apiGroups: [batch]
        apiVersions: [v1]
        operations: [CREATE, UPDATE]
        resources: [jobs, cronjobs]
        scope: Namespaced
{{- end }}
{{- define "gm.webhookCommon" }}
    admissionReviewVersions: [v1]
    sideEffects: None
    timeoutSeconds: {{ .Values.gpuAdmission.webhook.timeoutSeconds }}
    failurePolicy: {{ .Values.gpuAdmission.webhook.failurePolicy }}
    namespaceSelector:
      matchExpressions:
        - key: kubernetes.io/metadata.name
          operator: NotIn
          values: {{ include "gm.excludedNamespaces" . }}
{{- end }}
