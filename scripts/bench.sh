#!/usr/bin/env bash
# Every performance target of the project, measured by its benchmark (release builds).
#   scripts/bench.sh            all of them
#   scripts/bench.sh daemon     one group: placement | trace | extender | webhook | metrics | daemon
# Figures are printed by each bench; see the README's performance table for the targets.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

only="${1:-}"
case "$only" in
  ""|placement|trace|extender|webhook|metrics|daemon) ;;
  *) echo "unknown bench group '$only': use placement, trace, extender, webhook, metrics or daemon" >&2; exit 2 ;;
esac

run() { # group, cargo args...
  local group=$1; shift
  if [[ -n "$only" && "$only" != "$group" ]]; then return; fi
  section "bench: $group"
  cargo bench --locked "$@"
}

# Placement policies: one pod on one 8-card node, one pod over 1,000 nodes.
run placement -p gm-benches --bench placement
# A full replay of the openb default trace per policy (target: fgd under 10 s per seed).
run trace -p gm-benches --bench trace_replay
# Extender: filter + prioritize over 5,000 nodes x 8 cards (p99 <= 200 us in memory,
# <= 2 ms over HTTP in NodeNames mode).
run extender -p gm-extender --bench decision
# Webhook: one AdmissionReview round trip over TLS (p99 <= 1 ms).
run webhook -p gm-admission --bench review_roundtrip
# Metrics: one scrape with 8 cards x 200 containers (<= 10 ms).
run metrics -p gm-metrics --bench scrape
# Daemon: Allocate round trip with 200 live allocations (p99 <= 1 ms), kubelet.sock
# recreation to Register (<= 1 s), idle RSS with 8 simulated cards (<= 20 MiB).
run daemon -p gm-device-plugin --bench daemon
