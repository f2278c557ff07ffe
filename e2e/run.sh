#!/usr/bin/env bash
# The one command for the real-Kubernetes end-to-end tests. See README.md.
#
#   e2e/run.sh                      build (cached) + run every scenario
#   e2e/run.sh -run TestStubPlugin  build + run the matching scenario(s); args go to `go test`
#   e2e/run.sh build                only build the binaries into the cache
#   e2e/run.sh cluster [--nodes N]  build + start a control plane to use by hand
#
# Binaries are cached in ${E2E_CACHE:-$HOME/.cache/gpu-manager-e2e}/bin and
# rebuilt only when the Go toolchain, go.mod/go.sum, this script or the
# harness sources change. Go's own module and build caches stay at their
# defaults (`go env GOMODCACHE GOCACHE`), outside the repository.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"
export E2E_CACHE="${E2E_CACHE:-$HOME/.cache/gpu-manager-e2e}"
export E2E_BIN_DIR="${E2E_BIN_DIR:-$E2E_CACHE/bin}"

command -v go >/dev/null || { echo "e2e: the Go toolchain (go) is required" >&2; exit 2; }

build_key() {
  {
    go version
    cat go.mod go.sum run.sh
    find cmd internal -name '*.go' ! -name '*_test.go' | LC_ALL=C sort | xargs cat
  } | sha256sum | cut -d' ' -f1
}

build() {
  local key start k8s_version minor ldflags tmp
  key=$(build_key)
  if [[ -f "$E2E_BIN_DIR/.build-key" && "$(cat "$E2E_BIN_DIR/.build-key")" == "$key" ]]; then
    echo "e2e: binaries up to date in $E2E_BIN_DIR"
    return
  fi
  start=$(date +%s)
  k8s_version=$(go list -m -f '{{.Version}}' k8s.io/kubernetes)
  minor=$(cut -d. -f2 <<<"$k8s_version")
  # What Kubernetes' own build stamps in, so /version and kubectl report the
  # release instead of v0.0.0-master.
  ldflags="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
  done
  tmp="$E2E_BIN_DIR.tmp.$$"
  rm -rf "$tmp" && mkdir -p "$tmp"
  echo "e2e: building Kubernetes $k8s_version binaries, etcd and the node agent into $E2E_BIN_DIR ..."
  # One invocation so the packages compile in parallel. etcd's main package
  # is go.etcd.io/etcd/server/v3, which `go build` names "server".
  go build -ldflags "$ldflags" -o "$tmp/" \
    k8s.io/kubernetes/cmd/kube-apiserver \
    k8s.io/kubernetes/cmd/kube-scheduler \
    k8s.io/kubernetes/cmd/kubectl \
    go.etcd.io/etcd/server/v3 \
    ./cmd/gpu-node-agent \
    ./cmd/e2e-cluster
  mv "$tmp/server" "$tmp/etcd"
  echo "$key" >"$tmp/.build-key"
  rm -rf "$E2E_BIN_DIR" && mkdir -p "$(dirname "$E2E_BIN_DIR")" && mv "$tmp" "$E2E_BIN_DIR"
  echo "e2e: build took $(($(date +%s) - start))s"
}

# Our binaries, built with cargo in the project's target dir (cheap when
# scripts/test.sh already built the workspace), unless the caller points
# GPU_MANAGER_BIN / GPU_ADMISSION_BIN at binaries of its own. A failed build
# fails the run: the scenarios never skip for want of a binary.
build_ours() {
  if [[ -n "${GPU_MANAGER_BIN:-}" && -n "${GPU_ADMISSION_BIN:-}" ]]; then
    echo "e2e: using GPU_MANAGER_BIN=$GPU_MANAGER_BIN GPU_ADMISSION_BIN=$GPU_ADMISSION_BIN"
    return
  fi
  command -v cargo >/dev/null || { echo "e2e: cargo is required to build gpu-manager and gpu-admission (or set GPU_MANAGER_BIN and GPU_ADMISSION_BIN)" >&2; exit 2; }
  # shellcheck source=../scripts/env.sh
  source ../scripts/env.sh
  echo "e2e: cargo build --bin gpu-manager --bin gpu-admission (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
  (cd .. && cargo build --bin gpu-manager --bin gpu-admission) || {
    echo "e2e: building gpu-manager / gpu-admission with cargo failed (see above)" >&2; exit 1; }
  export GPU_MANAGER_BIN="$CARGO_TARGET_DIR/debug/gpu-manager"
  export GPU_ADMISSION_BIN="$CARGO_TARGET_DIR/debug/gpu-admission"
}

# helm renders the chart for scenario g (built once from the Go module
# proxy by scripts/tools.sh, cached outside the repository).
build_helm() {
  if [[ -n "${HELM_BIN:-}" ]]; then return; fi
  # shellcheck source=../scripts/env.sh
  source ../scripts/env.sh
  # shellcheck source=../scripts/tools.sh
  source ../scripts/tools.sh
  HELM_BIN="$(ensure_helm)" || { echo "e2e: building helm failed (see above)" >&2; exit 1; }
  export HELM_BIN
}

build_start=$(date +%s)
build
build_ours
build_helm
echo "e2e: build step $(($(date +%s) - build_start))s"

case "${1:-}" in
  build)
    exit 0
    ;;
  cluster)
    shift
    exec "$E2E_BIN_DIR/e2e-cluster" "$@"
    ;;
esac

# The harness's unit tests, then the scenarios. Scenarios share one control
# plane per `go test` process; -p 1 runs one package at a time on 2 cores.
# The output is kept to print a summary of every test's result and duration.
log="$(mktemp "${TMPDIR:-/tmp}/e2e-go-test.XXXXXX")"
trap 'rm -f "$log"' EXIT
test_start=$(date +%s)
set +e
go test ./internal/... ./scenarios -count=1 -p 1 -timeout "${E2E_TIMEOUT:-30m}" -v "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
echo
echo "e2e: summary (go test took $(($(date +%s) - test_start))s)"
grep -E '^e2e: (control plane|GPU stack) ready' "$log" || true
grep -E '^\s*--- (PASS|FAIL|SKIP): ' "$log" | sed -E 's/^\s*--- /  /' || true
if [[ $status -ne 0 ]]; then
  echo "e2e: FAILED (go test exit $status)"
fi
exit "$status"
