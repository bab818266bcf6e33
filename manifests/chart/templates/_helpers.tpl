{{/* The revision this release serves. */}}
{{- define "mesh.revision" -}}
{{- .Values.revision | default "default" -}}
{{- end -}}

{{/* Name of the injector's objects: mesh-injector for the default revision, mesh-injector-<rev> otherwise. */}}
{{- define "mesh.injector" -}}
{{- $rev := include "mesh.revision" . -}}
{{- if eq $rev "default" -}}mesh-injector{{- else -}}mesh-injector-{{ $rev }}{{- end -}}
{{- end -}}

{{/* Labels every object carries. */}}
{{- define "mesh.partOf" -}}
app.kubernetes.io/part-of: mesh-injector
{{- end -}}

{{/* Labels of the injector's objects (and of those both halves share): part-of + name. */}}
{{- define "mesh.injectorLabels" -}}
{{ include "mesh.partOf" . }}
{{ include "mesh.injectorSelector" . }}
{{- end -}}

{{/* Labels of the CNI node agent's objects. */}}
{{- define "mesh.cniLabels" -}}
{{ include "mesh.partOf" . }}
app.kubernetes.io/name: mesh-cni
{{- end -}}

{{/* Selector labels of the injector's pods (distinct per revision). */}}
{{- define "mesh.injectorSelector" -}}
app.kubernetes.io/name: {{ include "mesh.injector" . }}
{{- end -}}

{{/* The injector's config.yaml: the chart's injection values, then .Values.config merged over them. */}}
{{- define "mesh.config" -}}
{{- $base := dict
      "policy" "enabled"
      "defaultTemplates" .Values.defaultTemplates
      "values" (dict
        "proxy" (dict "cniImage" .Values.images.cni "capture" .Values.captureMode "nativeSidecars" (toString .Values.nativeSidecars))
        "mesh" (dict "revision" (include "mesh.revision" .))) -}}
{{- if .Values.templates }}{{- $_ := set $base "templates" .Values.templates }}{{- end }}
{{- toYaml (mustMergeOverwrite $base (deepCopy .Values.config)) -}}
{{- end -}}
