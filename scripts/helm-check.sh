#!/usr/bin/env bash
# Helm checks: lint, render with the default and the main alternative values, and check that
# deploy/manifests/ matches the chart. Schema validation against a real API server (server-side
# dry run) runs in the e2e suite (scenario g).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
source scripts/tools.sh
helm="$(ensure_helm)"
chart=deploy/helm/gpu-manager

"$helm" lint --strict "$chart"
"$helm" lint --strict "$chart" -f deploy/helm/values-alternative.yaml

render() { # name, args...
  local name=$1; shift
  local out
  out="$("$helm" template gpu-manager "$chart" "$@")"
  local kinds
  kinds=$(grep -c '^kind:' <<<"$out")
  echo "rendered $name: $kinds objects"
  [[ $kinds -gt 10 ]] || { echo "$name rendered too few objects" >&2; exit 1; }
}
render "default values" --namespace kube-system
render "alternative values" --namespace gpu-system -f deploy/helm/values-alternative.yaml

# Invalid choices must fail with the rule, not render something broken.
for bad in "scheduler.mode=bogus" "gpuAdmission.certs.mode=bogus"; do
  if msg=$("$helm" template gpu-manager "$chart" --set "$bad" 2>&1); then
    echo "rendering with $bad should have failed" >&2; exit 1
  fi
  grep -q "must be" <<<"$msg" || { echo "no clear error for $bad: $msg" >&2; exit 1; }
done

scripts/render-manifests.sh --check
