# Installs the outside tools the project's scripts need, into the cache outside the repo.
# Source it; then call the ensure_* functions, which print the tool's path.

HELM_VERSION="${HELM_VERSION:-v3.22.0}"

# helm, built from the Go module proxy (no release download needed).
ensure_helm() {
  local bin="$GM_CACHE/bin/helm"
  if [[ -x "$bin" ]] && "$bin" version --short 2>/dev/null | grep -q "${HELM_VERSION%.*}"; then
    echo "$bin"; return
  fi
  if ! command -v go >/dev/null; then
    echo "helm is missing and Go is not installed to build it" >&2; return 1
  fi
  echo "building helm $HELM_VERSION from the Go module proxy (once; cached in $GM_CACHE/bin)" >&2
  mkdir -p "$GM_CACHE/bin"
  GOBIN="$GM_CACHE/bin" GOFLAGS=-mod=mod go install "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" >&2
  echo "$bin"
}
