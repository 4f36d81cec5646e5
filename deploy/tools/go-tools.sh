#!/usr/bin/env bash
# Build (once) and cache the Go tools that check the Helm chart, then print their bin directory.
#
#   deploy/tools/go-tools.sh            # all tools
#   deploy/tools/go-tools.sh helm       # only some of them
#   PATH="$(deploy/tools/go-tools.sh):$PATH"
#
# Each tool is built from its Go module (the Go module proxy; no release downloads) into
# $POP3K_CACHE/go-tools/<tool>-<version>/ (default POP3K_CACHE=~/.cache/pop3-kafka); a binary
# built by the same recipe (module, version, linker flags; kept in .recipe beside it) is never
# rebuilt, so the script is idempotent and a warm run takes milliseconds. GOPATH, GOMODCACHE and GOCACHE live under $POP3K_CACHE/go (shared with the
# SeaweedFS build of deploy/local/objectstore.py), so CI reuses downloads and compiled packages.
# Cold builds on 2 cores (empty caches, downloads included): helm ~2 min, then kubeconform ~5 s
# and helm-unittest ~35 s (they share most packages with helm); about 2 min 40 s in all.
#
# helm and kubeconform: `go install <module>/cmd/<tool>@<version>`. helm-unittest's go.mod has a
# replace directive, which `go install ...@version` refuses: it is built from the small module in
# deploy/tools/helm-unittest/ (requires it as a tool, repeats the replace; go.sum pins every
# dependency), copied to a temporary directory so the work tree is never written.
#
# $POP3K_CACHE/go-tools/bin/ holds one symlink per tool to its pinned version; that directory is
# what the script prints (stdout carries only that line; progress goes to stderr).
# helm-unittest is also laid out as a Helm plugin ($POP3K_CACHE/go-tools/helm-plugins/unittest,
# plugin.yaml pointing at the cached binary): `HELM_PLUGINS=<that dir's parent> helm unittest`
# works offline, where `helm plugin install` would download a release.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# Pinned versions: the newest ones the Go module proxy listed when the chart was written.
HELM_VERSION=v3.22.0
KUBECONFORM_VERSION=v0.8.0
# helm-unittest's version is the one its wrapper module requires.
HELM_UNITTEST_VERSION=$(awk '$1 == "github.com/helm-unittest/helm-unittest" {print $2}' "$HERE/helm-unittest/go.mod")
[ -n "$HELM_UNITTEST_VERSION" ] || { echo "[go-tools] no helm-unittest version in $HERE/helm-unittest/go.mod" >&2; exit 1; }

declare -A MODULE=(
  [helm]="helm.sh/helm/v3/cmd/helm@${HELM_VERSION}"
  [kubeconform]="github.com/yannh/kubeconform/cmd/kubeconform@${KUBECONFORM_VERSION}"
  [helm-unittest]="github.com/helm-unittest/helm-unittest/cmd/helm-unittest"
)
# Linker flags. helm's Makefile stamps its version and the Kubernetes version it assumes by
# default (`helm template` without --kube-version, `helm lint`); a plain `go install` leaves
# v3.22 and Kubernetes 1.20, and 1.20 fails a chart's kubeVersion constraint. The Kubernetes
# minor follows the k8s.io/client-go the build uses (v0.37 -> 1.37), as in that Makefile.
declare -A LDFLAGS=(
  [helm]="-X helm.sh/helm/v3/internal/version.version=${HELM_VERSION}
    -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=37
    -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=37"
  [kubeconform]="-X main.version=${KUBECONFORM_VERSION}"
  # helm-unittest renders with helm v3.21.3's libraries and client-go v0.36 (its go.mod).
  [helm-unittest]="-X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=36"
)
# Tools built inside a wrapper module (directory under deploy/tools/) instead of `go install`.
declare -A WRAPPER=(
  [helm-unittest]="$HERE/helm-unittest"
)
declare -A VERSION=(
  [helm]="$HELM_VERSION"
  [kubeconform]="$KUBECONFORM_VERSION"
  [helm-unittest]="$HELM_UNITTEST_VERSION"
)
ALL_TOOLS=(helm kubeconform helm-unittest)

CACHE="${POP3K_CACHE:-$HOME/.cache/pop3-kafka}"
TOOLS_DIR="$CACHE/go-tools"
BIN_DIR="$TOOLS_DIR/bin"
GO_ROOT="$CACHE/go"
GO="${GO:-go}"

log() { echo "[go-tools] $*" >&2; }

tools=("$@")
[ ${#tools[@]} -gt 0 ] || tools=("${ALL_TOOLS[@]}")
for t in "${tools[@]}"; do
  [ -n "${MODULE[$t]:-}" ] || { log "unknown tool '$t' (known: ${ALL_TOOLS[*]})"; exit 2; }
done

mkdir -p "$TOOLS_DIR" "$BIN_DIR"
# One builder at a time: parallel test sessions (or CI jobs on one machine) wait for the first
# build instead of compiling the same tool twice on 2 cores.
exec 9>"$TOOLS_DIR/.lock"
flock 9

for t in "${tools[@]}"; do
  dest="$TOOLS_DIR/$t-${VERSION[$t]}"
  ldflags="-s -w $(echo ${LDFLAGS[$t]})"
  # What the binary was built from and how: a change of the recipe rebuilds it.
  recipe="${MODULE[$t]} ${VERSION[$t]} $ldflags"
  if [ ! -x "$dest/$t" ] || [ "$(cat "$dest/.recipe" 2>/dev/null)" != "$recipe" ]; then
    command -v "$GO" >/dev/null || { log "'$GO' not found: Go is needed to build $t"; exit 1; }
    log "building $t ${VERSION[$t]} from ${MODULE[$t]} (minutes on a cold cache)"
    start=$(date +%s)
    tmp="$dest.tmp.$$"
    rm -rf "$tmp"
    mkdir -p "$tmp"
    # GOTOOLCHAIN=local: never fetch another Go toolchain behind our back. -trimpath and
    # -buildvcs=false keep the build independent of the caller's directory.
    goenv=(env GOPATH="$GO_ROOT" GOMODCACHE="$GO_ROOT/pkg/mod" GOCACHE="$GO_ROOT/cache"
      GOFLAGS="-mod=mod -buildvcs=false" GOTOOLCHAIN=local CGO_ENABLED=0)
    if [ -n "${WRAPPER[$t]:-}" ]; then
      mkdir -p "$tmp/module"
      cp "${WRAPPER[$t]}/go.mod" "${WRAPPER[$t]}/go.sum" "$tmp/module/"
      (cd "$tmp/module" && "${goenv[@]}" "$GO" build -trimpath -ldflags "$ldflags" -o "$tmp/$t" "${MODULE[$t]}") >&2 \
        || { rm -rf "$tmp"; log "go build ${MODULE[$t]} (module ${WRAPPER[$t]}) failed"; exit 1; }
      rm -rf "$tmp/module"
    else
      "${goenv[@]}" GOBIN="$tmp" "$GO" install -trimpath -ldflags "$ldflags" "${MODULE[$t]}" >&2 \
        || { rm -rf "$tmp"; log "go install ${MODULE[$t]} failed"; exit 1; }
    fi
    echo "$recipe" >"$tmp/.recipe"
    rm -rf "$dest"
    mv "$tmp" "$dest"
    log "built $t in $(( $(date +%s) - start ))s"
  fi
  # Replace the symlink atomically: a concurrent reader never sees it missing.
  ln -sfn "$dest/$t" "$BIN_DIR/.$t.$$"
  mv -fT "$BIN_DIR/.$t.$$" "$BIN_DIR/$t"
done

# helm-unittest as a Helm plugin directory: the same binary, no download hooks.
if [ -x "$BIN_DIR/helm-unittest" ]; then
  plugin="$TOOLS_DIR/helm-plugins/unittest"
  mkdir -p "$plugin"
  cat >"$plugin/plugin.yaml.tmp" <<YAML
name: unittest
version: "${HELM_UNITTEST_VERSION#v}"
usage: run the chart's helm-unittest suites (tests/*_test.yaml)
description: helm-unittest, built from the Go module proxy by pop3-kafka's deploy/tools/go-tools.sh
ignoreFlags: false
command: "$TOOLS_DIR/helm-unittest-$HELM_UNITTEST_VERSION/helm-unittest"
YAML
  mv -f "$plugin/plugin.yaml.tmp" "$plugin/plugin.yaml"
fi

echo "$BIN_DIR"
