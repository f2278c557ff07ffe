#!/usr/bin/env bash
# The quick start: builds gpu-manager and kubelet-sim (release), runs gpu-manager on a simulated
# 8 x H100 node (no GPU, no cluster), lets kubelet-sim play the kubelet and admit a few demo pods
# through the device-plugin API, then shows the allocations, /usage and the four TKEStack
# metric families. Both keep running until Ctrl-C; everything lives in a temporary directory
# that is removed on exit.
#
# kubelet-sim is a development tool that speaks the kubelet's side of the device-plugin and
# pod-resources APIs; it is not a kubelet and runs no containers.
#
# Usage: scripts/quickstart.sh [--once] [--metrics-port N] [--bin-dir DIR]
#   --once            print everything, then stop both processes and exit (for checks)
#   --metrics-port N  port of gpu-manager's metrics server on 127.0.0.1 (default 5678; 0: any
#                     free port)
#   --bin-dir DIR     use gpu-manager, kubelet-sim and libvcuda.so from DIR instead of building
#                     them
# Environment: GM_QUICKSTART_METRICS_PORT, GM_QUICKSTART_BIN_DIR (same meaning as the flags),
# CARGO_TARGET_DIR (see scripts/env.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

ONCE=0
PORT="${GM_QUICKSTART_METRICS_PORT:-5678}"
BIN_DIR="${GM_QUICKSTART_BIN_DIR:-}"
NODE_FILE=deploy/examples/nodes/h100-sxm-8.yaml
NODE_NAME=gpu-node-1
# name:vcuda-core[:vcuda-memory]: the TKEStack documentation's example (30 vcuda-core = 0.3 of a
# card, 20 x 256 MiB = 5120 MiB), a second share, a whole card and a 2-card job.
PODS=(demo/train:30:20 demo/notebook:50:48 demo/infer:100 demo/big-job:200)

die() { echo "quickstart: $*" >&2; exit 1; }
usage() { awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --once) ONCE=1 ;;
    --metrics-port) [ $# -ge 2 ] || die "--metrics-port needs a port number"; PORT="$2"; shift ;;
    --metrics-port=*) PORT="${1#*=}" ;;
    --bin-dir) [ $# -ge 2 ] || die "--bin-dir needs a directory"; BIN_DIR="$2"; shift ;;
    --bin-dir=*) BIN_DIR="${1#*=}" ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1' (allowed: --once, --metrics-port N, --bin-dir DIR, --help)" ;;
  esac
  shift
done
case "$PORT" in
  ''|*[!0-9]*) die "--metrics-port '$PORT' is not a port number (0-65535; 0 picks a free port)" ;;
esac
[ "$PORT" -le 65535 ] || die "--metrics-port $PORT is not a port number (0-65535; 0 picks a free port)"
command -v curl >/dev/null 2>&1 || die "curl is needed to show /usage and /metrics; install it (apt-get install curl)"
[ -f "$NODE_FILE" ] || die "$NODE_FILE is missing; run this script from a checkout of the repository"

# --- ports -----------------------------------------------------------------------------------
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
if [ "$PORT" -ne 0 ] && port_in_use "$PORT"; then
  die "port $PORT on 127.0.0.1 is in use (another gpu-manager or quick start?). Stop it, or pick another port: scripts/quickstart.sh --metrics-port <port> (0: any free port)"
fi

# --- build -----------------------------------------------------------------------------------
if [ -n "$BIN_DIR" ]; then
  section "using prebuilt binaries from $BIN_DIR"
else
  command -v cargo >/dev/null 2>&1 || die "cargo is not installed; install Rust (https://rustup.rs) or pass --bin-dir"
  section "build gpu-manager, kubelet-sim and libvcuda.so (cargo build --release; target dir $CARGO_TARGET_DIR)"
  if ! cargo build --release --locked -p gm-device-plugin -p gm-testkit --bin gpu-manager --bin kubelet-sim \
     || ! cargo build --release --locked -p gm-limiter --lib; then
    die "the build failed (see the messages above); nothing was started"
  fi
  BIN_DIR="$CARGO_TARGET_DIR/release"
fi
for b in gpu-manager kubelet-sim; do
  [ -x "$BIN_DIR/$b" ] || die "$BIN_DIR/$b does not exist or is not executable"
done
# gpu-manager installs the in-container limiter into --limiter-install-dir and mounts it into
# share containers (kubelet-sim runs no containers, so here it is only installed and named).
[ -f "$BIN_DIR/libvcuda.so" ] || die "$BIN_DIR/libvcuda.so does not exist (cargo build --release -p gm-limiter builds it)"

# --- run -------------------------------------------------------------------------------------
TMP="$(mktemp -d "${TMPDIR:-/tmp}/gm-quickstart.XXXXXX")"
GM_PID=""
SIM_PID=""
stop() { # stop PID NAME: SIGTERM, up to 5 s for a clean exit, then SIGKILL
  local pid="$1" name="$2" i
  [ -n "$pid" ] || return 0
  kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 50); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    echo "quickstart: $name (pid $pid) did not stop within 5 s; killing it" >&2
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  local status=$?
  trap - EXIT INT TERM
  stop "$GM_PID" gpu-manager
  stop "$SIM_PID" kubelet-sim
  rm -rf "$TMP"
  echo "quickstart: stopped gpu-manager and kubelet-sim; removed $TMP"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Show a process' log and fail.
died() {
  echo "quickstart: $1 exited unexpectedly; its log ($2):" >&2
  sed 's/\x1b\[[0-9;]*m//g' "$2" | tail -n 30 >&2
  exit 1
}

section "start kubelet-sim and gpu-manager (temporary directory $TMP)"
SIM_ARGS=(--device-plugin-dir "$TMP/device-plugins"
          --pod-resources-socket "$TMP/pod-resources/kubelet.sock"
          --ready-file "$TMP/kubelet-sim.ready.json")
for p in "${PODS[@]}"; do SIM_ARGS+=(--pod "$p"); done
"$BIN_DIR/kubelet-sim" "${SIM_ARGS[@]}" >"$TMP/kubelet-sim.log" 2>&1 &
SIM_PID=$!
"$BIN_DIR/gpu-manager" --node-name "$NODE_NAME" \
  --backend simulated --node-file "$NODE_FILE" --standalone \
  --kubelet-dir "$TMP/device-plugins" \
  --pod-resources-socket "$TMP/pod-resources/kubelet.sock" \
  --checkpoint-dir "$TMP/checkpoint" --limiter-dir "$TMP/vcuda" \
  --limiter-library "$BIN_DIR/libvcuda.so" --limiter-install-dir "$TMP/lib" \
  --limiter-state-dir "$TMP/vcuda-state" \
  --metrics-addr "127.0.0.1:$PORT" >"$TMP/gpu-manager.log" 2>&1 &
GM_PID=$!
echo "kubelet-sim pid $SIM_PID, log $TMP/kubelet-sim.log"
echo "gpu-manager pid $GM_PID, log $TMP/gpu-manager.log"

# Wait until kubelet-sim has run every pod through the daemon (and, with port 0, learn the port
# from gpu-manager's start-up summary).
deadline=$(( $(date +%s) + 60 ))
ADDR=""
while :; do
  kill -0 "$SIM_PID" 2>/dev/null || died kubelet-sim "$TMP/kubelet-sim.log"
  kill -0 "$GM_PID" 2>/dev/null || died gpu-manager "$TMP/gpu-manager.log"
  if [ -z "$ADDR" ]; then
    if [ "$PORT" -ne 0 ]; then
      ADDR="127.0.0.1:$PORT"
    else
      ADDR="$(sed 's/\x1b\[[0-9;]*m//g' "$TMP/gpu-manager.log" \
              | sed -n 's#.*health: http://\([0-9.]*:[0-9]*\)/healthz.*#\1#p' | head -n 1)"
    fi
  fi
  [ -n "$ADDR" ] && [ -s "$TMP/kubelet-sim.ready.json" ] && break
  if [ "$(date +%s)" -gt "$deadline" ]; then
    echo "quickstart: the pods were not admitted within 60 s. kubelet-sim's log:" >&2
    cat "$TMP/kubelet-sim.log" >&2
    echo "gpu-manager's log:" >&2
    sed 's/\x1b\[[0-9;]*m//g' "$TMP/gpu-manager.log" | tail -n 30 >&2
    exit 1
  fi
  sleep 0.2
done

section "allocations (kubelet-sim: GetPreferredAllocation -> Allocate -> PreStartContainer per pod)"
cat "$TMP/kubelet-sim.log"

section "curl -s http://$ADDR/usage"
curl -sS --max-time 10 "http://$ADDR/usage" || die "cannot read http://$ADDR/usage"

section "the four TKEStack families: curl -s http://$ADDR/metrics | grep ^container_"
curl -sS --max-time 10 "http://$ADDR/metrics" \
  | grep -E '^container_(gpu_utilization|gpu_memory_total|request_gpu_utilization|request_gpu_memory)\{' \
  || die "no container_* families in http://$ADDR/metrics"
cat <<EOF

Requests: container_request_gpu_utilization is vcuda-core / 100 (0.3 for the 30 of demo/train)
and container_request_gpu_memory is vcuda-memory x 256 MiB (5120 for its 20 blocks).
Usage: with --standalone there is no API server, so the daemon knows no pod UIDs or container
IDs and cannot tie the node file's processes to these pods: the usage families stay 0 and
/usage lists the processes as unmapped. device-plugin/tests/real_prometheus.rs runs the same
node with pods from a pod source and shows the usage mapped.
EOF

if [ "$ONCE" -eq 1 ]; then
  section "--once: stopping"
  exit 0
fi

section "running"
cat <<EOF
gpu-manager: http://$ADDR/metrics, http://$ADDR/usage, http://$ADDR/readyz
             log $TMP/gpu-manager.log
kubelet-sim: prints registrations and device/health changes to $TMP/kubelet-sim.log
Press Ctrl-C to stop both and remove $TMP.
EOF
while :; do
  kill -0 "$SIM_PID" 2>/dev/null || died kubelet-sim "$TMP/kubelet-sim.log"
  kill -0 "$GM_PID" 2>/dev/null || died gpu-manager "$TMP/gpu-manager.log"
  sleep 1
done
