{{/*
Names, labels, the image, the rendered connector config and the rules the chart enforces.
*/}}

{{- define "pop3-kafka.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: at most 52 characters, so "<fullname>-headless" and the StatefulSet's
controller-revision-hash label ("<fullname>-<10 characters>") stay within 63.
*/}}
{{- define "pop3-kafka.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "pop3-kafka.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "pop3-kafka.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pop3-kafka.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "pop3-kafka.labels" -}}
helm.sh/chart: {{ include "pop3-kafka.chart" . }}
{{ include "pop3-kafka.selectorLabels" . }}
app.kubernetes.io/version: {{ regexReplaceAll "^[-_.]+|[-_.]+$" (include "pop3-kafka.imageTag" . | trunc 63) "" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "pop3-kafka.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "pop3-kafka.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The version the pods run, as app.kubernetes.io/version says it: image.tag, else the appVersion.
values.schema.json keeps image.tag a string (an unquoted 1.10 would be the number 1.1).
*/}}
{{- define "pop3-kafka.imageTag" -}}
{{- .Values.image.tag | default .Chart.AppVersion | toString }}
{{- end }}

{{/*
registry/repository:tag; with a digest registry/repository:tag@digest when a tag is given (the
digest decides what runs, the tag names it, as the version label does), else
registry/repository@digest (the label then says the appVersion).
*/}}
{{- define "pop3-kafka.image" -}}
{{- $repo := .Values.image.repository }}
{{- if .Values.image.registry }}
{{- $repo = printf "%s/%s" (trimSuffix "/" .Values.image.registry) $repo }}
{{- end }}
{{- if and .Values.image.digest .Values.image.tag }}
{{- printf "%s:%s@%s" $repo (toString .Values.image.tag) .Values.image.digest }}
{{- else if .Values.image.digest }}
{{- printf "%s@%s" $repo .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" $repo (include "pop3-kafka.imageTag" .) }}
{{- end }}
{{- end }}

{{/* ------------------------------------------------------------------ secrets */}}

{{- define "pop3-kafka.secretsMountPath" -}}
{{- trimSuffix "/" .Values.secretsMountPath }}
{{- end }}

{{/* The Secret behind entry (dict "root" $ "name" NAME "spec" SPEC): existingSecret or <fullname>-<name>. */}}
{{- define "pop3-kafka.secretName" -}}
{{- if .spec.existingSecret }}
{{- .spec.existingSecret }}
{{- else }}
{{- printf "%s-%s" (include "pop3-kafka.fullname" .root) .name | trunc 253 }}
{{- end }}
{{- end }}

{{- define "pop3-kafka.adminTokenSecretName" -}}
{{- .Values.admin.token.existingSecret | default (printf "%s-admin" (include "pop3-kafka.fullname" .)) }}
{{- end }}

{{- define "pop3-kafka.adminTokenKey" -}}
{{- if .Values.admin.token.existingSecret }}
{{- .Values.admin.token.existingSecretKey }}
{{- else }}
{{- print "token" }}
{{- end }}
{{- end }}

{{/* The admin token's file: <secretsMountPath>/admin/<key> ("admin" is reserved in `secrets`). */}}
{{- define "pop3-kafka.adminTokenPath" -}}
{{- printf "%s/admin/%s" (include "pop3-kafka.secretsMountPath" .) (include "pop3-kafka.adminTokenKey" .) }}
{{- end }}

{{/* ------------------------------------------------------------------ the connector config */}}

{{/*
The configuration file: .Values.config plus what the chart owns, once the chart's rules
(pop3-kafka.validate) pass, so every template that uses it stops on a bad value. admin.bind
listens on the pod IP (probes and Prometheus come from outside the pod), hence the token; the
spool lives on an emptyDir (the root file system is read-only); several replicas share the shards
through the consumer group (docs/decisions/0005-scale-out.md).
*/}}
{{- define "pop3-kafka.configData" -}}
{{- include "pop3-kafka.validate" . }}
{{- $cfg := deepCopy (.Values.config | default dict) }}
{{- $runtime := deepCopy (get $cfg "runtime" | default dict) }}
{{- $_ := set $runtime "spool_directory" .Values.spool.mountPath }}
{{- if gt (int .Values.replicaCount) 1 }}
{{- $_ := set $runtime "ownership" "group" }}
{{- end }}
{{- $_ := set $cfg "runtime" $runtime }}
{{- $token := dict "file" (include "pop3-kafka.adminTokenPath" .) }}
{{- $_ := set $cfg "admin" (dict "bind" (printf "0.0.0.0:%d" (int .Values.admin.port)) "token" $token) }}
{{- toYaml $cfg }}
{{- end }}

{{/*
Collects, from (dict "value" V "path" P "strings" {} "envRefs" {}), every string of V by its key
path into "strings" and every {env: NAME} secret reference into "envRefs".
*/}}
{{- define "pop3-kafka.walk" -}}
{{- $v := .value }}
{{- if kindIs "map" $v }}
{{- if and (hasKey $v "env") (kindIs "string" (get $v "env")) }}
{{- $_ := set $.envRefs $.path (get $v "env") }}
{{- end }}
{{- range $k, $x := $v }}
{{- include "pop3-kafka.walk" (dict "value" $x "path" (printf "%s.%s" $.path $k) "strings" $.strings "envRefs" $.envRefs) }}
{{- end }}
{{- else if kindIs "slice" $v }}
{{- range $i, $x := $v }}
{{- include "pop3-kafka.walk" (dict "value" $x "path" (printf "%s[%d]" $.path $i) "strings" $.strings "envRefs" $.envRefs) }}
{{- end }}
{{- else if kindIs "string" $v }}
{{- $_ := set $.strings $.path $v }}
{{- end }}
{{- end }}

{{/*
The longest cycle as "<seconds> <mailbox id> <max_seconds_per_cycle> <max_decode_seconds>": a
cycle checks its deadline between mails, so one mail's decode time can come on top of
max_seconds_per_cycle (connector/config/model.py, _check_delivery_options).
*/}}
{{- define "pop3-kafka.longestCycle" -}}
{{- $longest := 0.0 }}
{{- $which := list "-" 0.0 0.0 }}
{{- range (.Values.config | default dict).mailboxes | default list }}
{{- $cycle := float64 (.max_seconds_per_cycle | default 60.0) }}
{{- $decode := float64 (dig "decode_limits" "max_decode_seconds" 10.0 .) }}
{{- if gt (addf $cycle $decode) $longest }}
{{- $longest = addf $cycle $decode }}
{{- $which = list .id $cycle $decode }}
{{- end }}
{{- end }}
{{- printf "%g %v %g %g" $longest (index $which 0) (index $which 1) (index $which 2) }}
{{- end }}

{{- define "pop3-kafka.shutdownGraceSeconds" -}}
{{- float64 (dig "runtime" "shutdown_grace_seconds" 30.0 (.Values.config | default dict)) }}
{{- end }}

{{/*
terminationGracePeriodSeconds: after SIGTERM the connector lets cycles in flight end for up to
runtime.shutdown_grace_seconds, then QUITs and exits 0. A SIGKILL before that cuts cycles off:
their transactions abort (the mail is fetched again later, nothing is lost or doubled), but their
POP3 sessions end without QUIT and a maildrop may stay locked ([IN-USE]) until the server times
the session out. Hence: the grace plus the longest cycle plus a margin.
*/}}
{{- define "pop3-kafka.terminationGracePeriodSeconds" -}}
{{- $longest := float64 (first (splitList " " (include "pop3-kafka.longestCycle" .))) }}
{{- $needed := addf (include "pop3-kafka.shutdownGraceSeconds" .) $longest }}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- int (ceil (addf $needed .Values.terminationGraceMarginSeconds)) }}
{{- else }}
{{- int .Values.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{/* ------------------------------------------------------------------ rules */}}

{{/*
Everything the chart refuses, each with the key at fault and the fix. Rendering stops at the
first problem, before anything reaches the cluster.
*/}}
{{- define "pop3-kafka.validate" -}}
{{- $cfg := .Values.config | default dict }}
{{- $runtime := get $cfg "runtime" | default dict }}
{{- $replicas := int .Values.replicaCount }}
{{- $mount := include "pop3-kafka.secretsMountPath" . }}

{{- /* keys the chart owns */}}
{{- if hasKey $cfg "admin" }}
{{- fail "config.admin: set by the chart (admin.bind from admin.port, admin.token from admin.token.*); remove it from config" }}
{{- end }}
{{- if hasKey $runtime "spool_directory" }}
{{- fail (printf "config.runtime.spool_directory: set by the chart to the spool emptyDir (spool.mountPath, now %s); remove it from config" .Values.spool.mountPath) }}
{{- end }}
{{- if not ((get $cfg "mailboxes") | default list) }}
{{- fail "config.mailboxes: the list is empty; configure at least one mailbox" }}
{{- end }}

{{- /* several replicas: shards shared through the consumer group (docs/decisions/0005-scale-out.md) */}}
{{- $group := or (gt $replicas 1) (eq (get $runtime "ownership" | default "all") "group") }}
{{- if gt $replicas 1 }}
{{- if eq (get $runtime "ownership" | default "group") "all" }}
{{- fail (printf "config.runtime.ownership: 'all' with replicaCount %d would make every replica poll every mailbox; remove it (the chart sets group) or use replicaCount: 1" $replicas) }}
{{- end }}
{{- if eq (dig "delivery" "mode" "exactly_once" $cfg) "at_least_once" }}
{{- fail (printf "config.delivery.mode: at_least_once cannot share mailboxes between replicas (runtime.ownership: group needs exactly_once); use exactly_once or replicaCount: 1 (now %d)" $replicas) }}
{{- end }}
{{- end }}
{{- if and $group (hasKey $runtime "instance_id") }}
{{- fail "config.runtime.instance_id: every replica would join the owners group with the same static id; remove it (each pod uses its POD_NAME)" }}
{{- end }}

{{- /* Secret files are mode 0440 (root:fsGroup, see statefulset.yaml): user 10001 reads them only
through the fsGroup, so a pod security context without one would make every secret unreadable */}}
{{- $psc := .Values.podSecurityContext | default dict }}
{{- if kindIs "invalid" $psc.fsGroup }}
{{- fail "podSecurityContext.fsGroup: required: the Secret files (the admin token, every `secrets` entry) are mounted with mode 0440, owned by root and the fsGroup, so the connector reads them only through that group; set podSecurityContext.fsGroup (the default is 10001; on OpenShift, a GID of the namespace's openshift.io/sa.scc.supplemental-groups range)" }}
{{- end }}

{{- /* the admin token */}}
{{- $tok := .Values.admin.token }}
{{- if and $tok.existingSecret $tok.value }}
{{- fail "admin.token: give existingSecret or value, not both" }}
{{- end }}
{{- if not (or $tok.existingSecret $tok.value) }}
{{- fail "admin.token: required: the admin endpoint listens on the pod IP for probes and Prometheus, and the connector refuses a non-loopback admin.bind without a bearer token; set admin.token.existingSecret (a Secret you manage) or admin.token.value (>= 16 characters)" }}
{{- end }}
{{- if and $tok.value (lt (len (toString $tok.value)) 16) }}
{{- fail (printf "admin.token.value: %d characters; the connector needs at least 16" (len (toString $tok.value))) }}
{{- end }}

{{- /* the secrets entries */}}
{{- $envProvided := dict "POD_NAME" true "TMPDIR" true }}
{{- range $name, $spec := .Values.secrets }}
{{- if not (regexMatch "^[a-z0-9]([-a-z0-9]{0,38}[a-z0-9])?$" $name) }}
{{- fail (printf "secrets.%s: the name must be 1-40 characters of a-z, 0-9 and '-' (it names a volume, a directory and, when created, the Secret <fullname>-%s)" $name $name) }}
{{- end }}
{{- if eq $name "admin" }}
{{- fail "secrets.admin: the name is reserved for the admin token (admin.token); use another name" }}
{{- end }}
{{- $created := or $spec.stringData $spec.data }}
{{- if and $spec.existingSecret $created }}
{{- fail (printf "secrets.%s: give existingSecret or stringData/data, not both" $name) }}
{{- end }}
{{- if not (or $spec.existingSecret $created) }}
{{- fail (printf "secrets.%s: give existingSecret (a Secret you manage) or stringData/data (the chart creates the Secret)" $name) }}
{{- end }}
{{- range $var, $key := $spec.env }}
{{- if not (regexMatch "^[A-Za-z_][A-Za-z0-9_]*$" $var) }}
{{- fail (printf "secrets.%s.env: %q is not an environment variable name" $name $var) }}
{{- end }}
{{- if and $created (not (or (hasKey ($spec.stringData | default dict) $key) (hasKey ($spec.data | default dict) $key))) }}
{{- fail (printf "secrets.%s.env.%s: key %q is not in secrets.%s.stringData or .data" $name $var $key $name) }}
{{- end }}
{{- $_ := set $envProvided $var true }}
{{- end }}
{{- end }}
{{- range .Values.extraEnv }}
{{- $_ := set $envProvided .name true }}
{{- end }}

{{- /* every secret file the config names is mounted, and every env secret is provided */}}
{{- $found := dict "strings" (dict) "envRefs" (dict) }}
{{- include "pop3-kafka.walk" (dict "value" $cfg "path" "config" "strings" $found.strings "envRefs" $found.envRefs) }}
{{- range $path, $value := $found.strings }}
{{- if hasPrefix (printf "%s/" $mount) $value }}
{{- $rest := trimPrefix (printf "%s/" $mount) $value }}
{{- $name := first (splitList "/" $rest) }}
{{- $key := trimPrefix (printf "%s/" $name) $rest }}
{{- $spec := get $.Values.secrets $name }}
{{- if not $spec }}
{{- fail (printf "%s: %s is under secretsMountPath, but there is no secrets.%s to mount there; add it (existingSecret or stringData) or fix the path" $path $value $name) }}
{{- end }}
{{- if eq (toString $spec.mount) "false" }}
{{- fail (printf "%s: %s names secrets.%s, which has mount: false; mount it or use {env: ...}" $path $value $name) }}
{{- end }}
{{- if or (eq $key $rest) (contains "/" $key) (eq $key "") }}
{{- fail (printf "%s: %s must be %s/%s/<key> (one key of the Secret)" $path $value $mount $name) }}
{{- end }}
{{- if and (not $spec.existingSecret) (not (or (hasKey ($spec.stringData | default dict) $key) (hasKey ($spec.data | default dict) $key))) }}
{{- fail (printf "%s: %s names key %q, which secrets.%s.stringData/data does not have" $path $value $key $name) }}
{{- end }}
{{- end }}
{{- end }}
{{- if not .Values.extraEnvFrom }}
{{- range $path, $var := $found.envRefs }}
{{- if not (hasKey $envProvided $var) }}
{{- fail (printf "%s: {env: %s} is not set in the pod; add it to a secrets entry's env (secrets.<name>.env.%s: <key>) or to extraEnv" $path $var $var) }}
{{- end }}
{{- end }}
{{- end }}

{{- /* SIGKILL must not come before the longest cycle and the shutdown grace are over */}}
{{- if not (kindIs "invalid" .Values.terminationGracePeriodSeconds) }}
{{- $parts := splitList " " (include "pop3-kafka.longestCycle" .) }}
{{- $grace := float64 (include "pop3-kafka.shutdownGraceSeconds" .) }}
{{- $needed := addf $grace (index $parts 0) }}
{{- if le (float64 .Values.terminationGracePeriodSeconds) $needed }}
{{- fail (printf "terminationGracePeriodSeconds: %v is not above runtime.shutdown_grace_seconds (%g) + the longest cycle (%s s: mailbox %s, max_seconds_per_cycle %s + decode_limits.max_decode_seconds %s) = %g; set it above %g, or leave it null to have it computed" .Values.terminationGracePeriodSeconds $grace (index $parts 0) (index $parts 1) (index $parts 2) (index $parts 3) $needed $needed) }}
{{- end }}
{{- end }}
{{- end }}

{{/* A probe: (dict "probe" .Values.probes.X "path" "/healthz"). */}}
{{- define "pop3-kafka.probe" -}}
httpGet:
  path: {{ .path }}
  port: admin
{{ toYaml (omit .probe "enabled") }}
{{- end }}

{{/* An emptyDir from (dict "medium" ... "sizeLimit" ...); {} when neither is set. */}}
{{- define "pop3-kafka.emptyDir" -}}
{{- $d := dict }}
{{- with .medium }}{{ $_ := set $d "medium" . }}{{ end }}
{{- with .sizeLimit }}{{ $_ := set $d "sizeLimit" . }}{{ end }}
{{- toYaml $d }}
{{- end }}

{{/*
What checksum/secrets hashes: the name and content of every Secret the chart creates, not their
labels, so a new chart version alone does not count as a changed secret.
*/}}
{{- define "pop3-kafka.secretsChecksum" -}}
{{- $all := dict }}
{{- if .Values.admin.token.value }}
{{- $_ := set $all (include "pop3-kafka.adminTokenSecretName" .) (dict "token" (toString .Values.admin.token.value)) }}
{{- end }}
{{- range $name, $spec := .Values.secrets }}
{{- if not $spec.existingSecret }}
{{- $_ := set $all (include "pop3-kafka.secretName" (dict "root" $ "name" $name "spec" $spec)) (dict "stringData" ($spec.stringData | default dict) "data" ($spec.data | default dict)) }}
{{- end }}
{{- end }}
{{- toJson $all | sha256sum }}
{{- end }}


{{/* ------------------------------------------------------------------ network policy */}}

{{/*
The URL's port for the NetworkPolicy, from (dict "url" U): its explicit port, else 443 (https) or
80 (http); empty for a loopback host, which never leaves the pod.
*/}}
{{- define "pop3-kafka.urlPort" -}}
{{- $u := urlParse .url }}
{{- $host := $u.host | default "" }}
{{- $hostname := regexReplaceAll ":[0-9]+$" $host "" | trimPrefix "[" | trimSuffix "]" | lower }}
{{- if not (or (eq $hostname "localhost") (hasPrefix "127." $hostname) (eq $hostname "::1")) }}
{{- regexFind "[0-9]+$" (regexFind ":[0-9]+$" $host) | default (ternary "80" "443" (eq (lower $u.scheme) "http")) }}
{{- end }}
{{- end }}

{{/*
The egress `config` needs, into (dict "root" $ "out" {}): out.<rule> is a list of {port, why} for
the rules kafka, pop3, tokenEndpoint and objectStore, all TCP.
*/}}
{{- define "pop3-kafka.egressNeeds" -}}
{{- $cfg := .root.Values.config | default dict }}
{{- $kafka := list }}
{{- $pop3 := list }}
{{- $token := list }}
{{- $store := list }}
{{- range splitList "," (toString (dig "kafka" "bootstrap_servers" "" $cfg)) }}
{{- $server := trim . }}
{{- if $server }}
{{- $hostport := regexReplaceAll "^[A-Za-z_]+://" $server "" }}
{{- $port := regexFind "[0-9]+$" (regexFind ":[0-9]+$" $hostport) | default "9092" }}
{{- $kafka = append $kafka (dict "port" (int $port) "why" (printf "config.kafka.bootstrap_servers (%s)" $server)) }}
{{- end }}
{{- end }}
{{- range $i, $m := (get $cfg "mailboxes" | default list) }}
{{- $where := printf "config.mailboxes[%d] (id %v)" $i $m.id }}
{{- $port := 0 }}
{{- if kindIs "invalid" $m.port }}
{{- $port = ternary 995 110 (eq (toString ($m.tls | default "implicit")) "implicit") }}
{{- else }}
{{- $port = int $m.port }}
{{- end }}
{{- $pop3 = append $pop3 (dict "port" $port "why" (printf "%s: POP3 server %v:%d" $where $m.host $port)) }}
{{- with $m.oauth2 }}
{{- if .token_url }}
{{- $p := include "pop3-kafka.urlPort" (dict "url" .token_url) }}
{{- if $p }}
{{- $token = append $token (dict "port" (int $p) "why" (printf "%s: oauth2.token_url %s" $where .token_url)) }}
{{- end }}
{{- else }}
{{- $token = append $token (dict "port" 443 "why" (printf "%s: the token_uri of oauth2.service_account_file (https)" $where)) }}
{{- end }}
{{- end }}
{{- end }}
{{- $offload := get $cfg "offload" | default dict }}
{{- if eq (toString $offload.kind) "s3" }}
{{- if $offload.endpoint_url }}
{{- $p := include "pop3-kafka.urlPort" (dict "url" $offload.endpoint_url) }}
{{- if $p }}
{{- $store = append $store (dict "port" (int $p) "why" (printf "config.offload.endpoint_url %s" $offload.endpoint_url)) }}
{{- end }}
{{- else }}
{{- $store = append $store (dict "port" 443 "why" "config.offload (kind s3 without endpoint_url: AWS S3, https)") }}
{{- end }}
{{- end }}
{{- $_ := set .out "kafka" $kafka }}
{{- $_ := set .out "pop3" $pop3 }}
{{- $_ := set .out "tokenEndpoint" $token }}
{{- $_ := set .out "objectStore" $store }}
{{- end }}

{{/* "true" when a NetworkPolicyPort of (dict "ports" LIST "port" N) admits TCP port N. */}}
{{- define "pop3-kafka.portsAdmit" -}}
{{- $n := int .port }}
{{- range .ports }}
{{- if eq (upper (toString (.protocol | default "TCP"))) "TCP" }}
{{- if eq (toString .port) (toString $n) }}true{{ end }}
{{- if and .endPort (not (kindIs "string" .port)) }}
{{- if and (le (int .port) $n) (ge (int .endPort) $n) }}true{{ end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* "true" when an egress rule of (dict "rules" LIST "port" N) admits TCP port N (peers are not compared). */}}
{{- define "pop3-kafka.rulesAdmit" -}}
{{- $n := .port }}
{{- range .rules }}
{{- if not .ports }}true{{ else }}{{ include "pop3-kafka.portsAdmit" (dict "ports" .ports "port" $n) }}{{ end }}
{{- end }}
{{- end }}
