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
{{- /*
Which objects reach the webhooks (CEL matchConditions, Kubernetes 1.30+): only those that
ask for <domain>/vcuda-* resources (requests or limits of containers or initContainers, in a
pod's spec or a workload's pod template, CronJob's included) or carry one of our annotations
(<domain>/predicate-*, <domain>/gpu-*, <domain>/vcuda-*) on the object or its pod template, in
the new object or (UPDATE) the old one. Everything else is admitted without calling
gpu-admission, so its outage blocks GPU work only (failurePolicy stays Fail for that). Every
step is guarded with has() / != null: an evaluation error would be a rejection.
*/ -}}
{{- define "gm.celSpec" -}}
{{- $p := index . 0 }}{{ $d := index . 1 -}}
{{- $r := printf "r.startsWith('%s/vcuda-')" $d -}}
{{- $c := printf "has(c.resources) && ((has(c.resources.requests) && c.resources.requests.exists(r, %s)) || (has(c.resources.limits) && c.resources.limits.exists(r, %s)))" $r $r -}}
(has({{ $p }}.containers) && {{ $p }}.containers.exists(c, {{ $c }})) || (has({{ $p }}.initContainers) && {{ $p }}.initContainers.exists(c, {{ $c }}))
{{- end -}}
{{- define "gm.celMeta" -}}
{{- $m := index . 0 }}{{ $d := index . 1 -}}
(has({{ $m }}.annotations) && {{ $m }}.annotations.exists(k, k.startsWith('{{ $d }}/predicate-') || k.startsWith('{{ $d }}/gpu-') || k.startsWith('{{ $d }}/vcuda-')))
{{- end -}}
{{- define "gm.celPodTemplate" -}}
{{- $t := index . 0 }}{{ $d := index . 1 -}}
(has({{ $t }}.metadata) && {{ include "gm.celMeta" (list (printf "%s.metadata" $t) $d) }}) || (has({{ $t }}.spec) && ({{ include "gm.celSpec" (list (printf "%s.spec" $t) $d) }}))
{{- end -}}
{{- define "gm.celObject" -}}
{{- $o := index . 0 }}{{ $d := index . 1 -}}
({{ $o }} != null && ((has({{ $o }}.metadata) && {{ include "gm.celMeta" (list (printf "%s.metadata" $o) $d) }}) || (has({{ $o }}.spec) && (({{ include "gm.celSpec" (list (printf "%s.spec" $o) $d) }}) || (has({{ $o }}.spec.template) && ({{ include "gm.celPodTemplate" (list (printf "%s.spec.template" $o) $d) }})) || (has({{ $o }}.spec.jobTemplate) && has({{ $o }}.spec.jobTemplate.spec) && has({{ $o }}.spec.jobTemplate.spec.template) && ({{ include "gm.celPodTemplate" (list (printf "%s.spec.jobTemplate.spec.template" $o) $d) }}))))))
{{- end -}}
{{- define "gm.webhookMatchConditions" }}
    matchConditions:
      - name: gpu-objects-only
        expression: {{ printf "%s || %s" (include "gm.celObject" (list "object" .Values.resourceDomain)) (include "gm.celObject" (list "oldObject" .Values.resourceDomain)) | quote }}
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
    {{- include "gm.webhookMatchConditions" . }}
{{- end }}
