#!/usr/bin/env bash
# The limiter's check on a real H100/H200 (limiter/gpucheck/README.md).
#
#   bash limiter/gpucheck/run.sh [LIBVCUDA_SO] [GPUCHECK]
#
# Defaults: the first of $CARGO_TARGET_DIR, <repo>/target (profiles limiter, then release)
# holding libvcuda.so / gpucheck. Needs only the NVIDIA driver (libcuda.so.1,
# libnvidia-ml.so.1, nvidia-smi optional) and coreutils `timeout`.
#
# Every result is one JSON line on stdout (the per-100-ms `sample` lines of the samplers go to
# the results file only). The results file is $OUT/gpucheck.jsonl when $OUT is set, else a
# temp file whose path is printed on stderr; per-step stderr (limiter logs) lands beside it in
# gpucheck-logs/. The last line is the `summary` verdict. Exit code: 0 when the summary passes.
#
# Hard limit: GPUCHECK_BUDGET_S (default 330 s, capped at 360 s) for everything; each step has
# its own `timeout` and is skipped (a JSON line says so) once the deadline is near.
set -u

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)

find_artifact() { # NAME -> path of the first existing build artifact, or the name itself
    local name=$1 dir prof
    for dir in ${CARGO_TARGET_DIR:+"$CARGO_TARGET_DIR"} "$ROOT/target"; do
        for prof in limiter release debug; do
            if [ -e "$dir/$prof/$name" ]; then
                echo "$dir/$prof/$name"
                return
            fi
        done
    done
    echo "$name"
}

LIB=${1:-$(find_artifact libvcuda.so)}
GC=${2:-$(find_artifact gpucheck)}
BUDGET=${GPUCHECK_BUDGET_S:-330}
[ "$BUDGET" -gt 360 ] 2>/dev/null && BUDGET=360
DEADLINE=$((SECONDS + BUDGET))

WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpucheck.XXXXXX")
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    RESULTS="$OUT/gpucheck.jsonl"
    LOGS="$OUT/gpucheck-logs"
else
    RESULTS="$WORK/results.jsonl"
    LOGS="$WORK/logs"
fi
mkdir -p "$LOGS"
: >"$RESULTS"

json_str() { # escape for a JSON string body
    printf '%s' "$1" | sed -e 's/\\/\\\\/g' -e 's/"/\\"/g' -e 's/\t/ /g' | tr '\n\r' '  ' | cut -c1-600
}
emit() { # one JSON line to stdout and the results file
    printf '%s\n' "$1" >>"$RESULTS"
    printf '%s\n' "$1"
}
left() { echo $((DEADLINE - SECONDS)); }

# step NAME LIMIT_S CMD...: run CMD with a timeout (never past the deadline); its JSON lines go to
# the results file (and, except samples, to stdout); its stderr to $LOGS/NAME.err.
step() {
    local name=$1 limit=$2
    shift 2
    local l
    l=$(left)
    if [ "$l" -lt 8 ]; then
        emit "{\"check\":\"step\",\"tag\":\"$name\",\"skipped\":true,\"error\":\"deadline reached\"}"
        return 124
    fi
    [ "$limit" -gt "$l" ] && limit=$l
    local out="$WORK/$name.out"
    timeout -k 5 "$limit" "$@" >"$out" 2>"$LOGS/$name.err"
    local rc=$?
    cat "$out" >>"$RESULTS"
    grep -v '"check":"sample"' "$out"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        emit "{\"check\":\"step\",\"tag\":\"$name\",\"error\":\"timed out after ${limit} s\",\"stderr\":\"$(json_str "$(tail -c 400 "$LOGS/$name.err")")\"}"
    elif [ "$rc" -ne 0 ] && ! grep -q -e '"error":"' -e '"pass":false' "$out"; then
        # Died without saying why (a crash inside a hook, a signal): keep its stderr.
        emit "{\"check\":\"step\",\"tag\":\"$name\",\"error\":\"exit code $rc\",\"stderr\":\"$(json_str "$(tail -c 400 "$LOGS/$name.err")")\"}"
    fi
    return "$rc"
}

# penv CFG: sets PENV to the `env` prefix that preloads the limiter with this config and a
# fresh state dir (a fresh dir is a separate "container"). Only the command gets the preload,
# not `timeout` or this shell.
penv() {
    PENV=(env LD_PRELOAD="$LIB" VCUDA_CFG="$1" VCUDA_STATE_DIR="$(mktemp -d "$WORK/state.XXXXXX")")
}

# with_sampler NAME SAMPLER_MAX_S TARGET STEP_LIMIT CMD...: CMD as step NAME, with an
# un-preloaded `sampler` (tag sampler_NAME) running beside it until CMD ends.
with_sampler() {
    local name=$1 smax=$2 target=$3 limit=$4
    shift 4
    local stop="$WORK/$name.stop"
    local targs=()
    [ -n "$target" ] && targs=(--target "$target")
    rm -f "$stop"
    step "sampler_$name" $((smax + 5)) "$GC" --tag "sampler_$name" sampler --seconds "$smax" \
        --interval-ms 100 --stop-file "$stop" ${targs[@]+"${targs[@]}"} &
    local spid=$!
    sleep 0.3
    step "$name" "$limit" "$@"
    touch "$stop"
    wait "$spid"
}

# ---- preflight ------------------------------------------------------------------------------
emit "{\"check\":\"run\",\"libvcuda\":\"$(json_str "$LIB")\",\"gpucheck\":\"$(json_str "$GC")\",\"budget_s\":$BUDGET,\"results\":\"$(json_str "$RESULTS")\"}"
if [ ! -x "$GC" ]; then
    emit "{\"check\":\"run\",\"error\":\"gpucheck not found or not executable: $(json_str "$GC")\"}"
    exit 1
fi
if [ ! -f "$LIB" ]; then
    emit "{\"check\":\"run\",\"error\":\"libvcuda.so not found: $(json_str "$LIB")\"}"
    exit 1
fi
LIB=$(cd "$(dirname "$LIB")" && pwd)/$(basename "$LIB")
if [ -e /etc/vcuda/vcuda.cfg ]; then
    emit "{\"check\":\"run\",\"warning\":\"/etc/vcuda/vcuda.cfg exists: the limiter ignores VCUDA_CFG, so the configs written here are not used\"}"
fi
if [ -e /etc/ld.so.preload ] && grep -q vcuda /etc/ld.so.preload 2>/dev/null; then
    emit "{\"check\":\"run\",\"warning\":\"/etc/ld.so.preload loads a limiter into every process: the un-preloaded baselines are not unlimited\"}"
fi
PY_TORCH=false
if command -v python3 >/dev/null 2>&1 && timeout 20 python3 -c 'import torch' >/dev/null 2>&1; then
    PY_TORCH=true
fi
emit "{\"check\":\"run\",\"torch_available\":$PY_TORCH,\"nvidia_smi\":$(command -v nvidia-smi >/dev/null 2>&1 && echo true || echo false)}"

# ---- the card -------------------------------------------------------------------------------
step info 30 "$GC" --tag info info
PHYS=$(sed -n 's/.*"check":"info".*"physical_bytes":\([0-9][0-9]*\).*/\1/p' "$WORK/info.out" | head -n1)
UUID=$(timeout 20 "$GC" uuid --plain 2>/dev/null) || UUID=""
UUID=$(printf '%s\n' "$UUID" | head -n1)
if [ -z "$UUID" ] && command -v nvidia-smi >/dev/null 2>&1; then
    UUID=$(nvidia-smi --query-gpu=uuid --format=csv,noheader 2>/dev/null | head -n1 | tr -d ' ')
fi
MINOR=$(sed -n 's/.*"check":"info".*"minor":\([0-9][0-9]*\).*/\1/p' "$WORK/info.out" | head -n1)
MINOR=${MINOR:-0}
if [ -z "$UUID" ] || [ -z "$PHYS" ]; then
    emit "{\"check\":\"run\",\"error\":\"no GPU: uuid='$(json_str "$UUID")' physical_bytes='${PHYS:-}'\"}"
    "$GC" summarize --file "$RESULTS" | tee -a "$RESULTS"
    exit 1
fi

CAP=$((8 << 30))
CFG30="$WORK/vcuda-30.cfg"
CFG70="$WORK/vcuda-70.cfg"
CFG100="$WORK/vcuda-100.cfg"
step config_30 10 "$GC" --tag config_30 write-config --out "$CFG30" --uuid "$UUID" --minor "$MINOR" --cores 30 --memory-bytes "$CAP"
step config_70 10 "$GC" --tag config_70 write-config --out "$CFG70" --uuid "$UUID" --minor "$MINOR" --cores 70 --memory-bytes "$CAP"
step config_100 10 "$GC" --tag config_100 write-config --out "$CFG100" --uuid "$UUID" --minor "$MINOR" --cores 100 --memory-bytes "$PHYS"

# ---- 1. routing smoke -----------------------------------------------------------------------
step routing_plain 30 "$GC" --tag routing_plain routing
penv "$CFG30"
step routing_preload 30 "${PENV[@]}" "$GC" --tag routing_preload routing --expect-object libvcuda
penv "$CFG30"
step overhead_ptsz_preload 40 "${PENV[@]}" "$GC" --tag overhead_ptsz_preload overhead --api ptsz --launches 20000 --alloc-pairs 100

# ---- 2. memory cap 8 GiB --------------------------------------------------------------------
penv "$CFG30"
with_sampler mem_preload 40 "" 45 \
    "${PENV[@]}" "$GC" --tag mem_preload mem --cap-bytes "$CAP" --physical-bytes "$PHYS" --hold-ms 400
if command -v nvidia-smi >/dev/null 2>&1 && [ "$(left)" -gt 50 ]; then
    for mode in plain preload; do
        if [ "$mode" = preload ]; then
            penv "$CFG30"
            smi=$(timeout 20 "${PENV[@]}" nvidia-smi --query-gpu=memory.total,memory.used --format=csv,noheader,nounits 2>"$LOGS/nvidia_smi_$mode.err" | head -n1)
        else
            smi=$(timeout 20 nvidia-smi --query-gpu=memory.total,memory.used --format=csv,noheader,nounits 2>"$LOGS/nvidia_smi_$mode.err" | head -n1)
        fi
        total=$(printf '%s' "$smi" | cut -d, -f1 | tr -dc '0-9')
        used=$(printf '%s' "$smi" | cut -d, -f2 | tr -dc '0-9')
        emit "{\"check\":\"nvidia_smi\",\"tag\":\"nvidia_smi_$mode\",\"total_mib\":${total:-null},\"used_mib\":${used:-null},\"raw\":\"$(json_str "$smi")\"}"
    done
fi

# ---- 3. compute share 30 % ------------------------------------------------------------------
S=${GPUCHECK_SHARE_S:-15}
# kernel_args STEP: the limited run reuses the baseline's calibration (same kernel length, so
# the ratio compares like with like, and no calibration happens under the throttle).
kernel_args() {
    local f="$WORK/$1.out" rate alone
    rate=$(sed -n 's/.*"check":"share".*"units_per_ms":\([0-9.][0-9.]*\).*/\1/p' "$f" 2>/dev/null | head -n1)
    alone=$(sed -n 's/.*"check":"share".*"kernel_ms_measured":\([0-9.][0-9.]*\).*/\1/p' "$f" 2>/dev/null | head -n1)
    KARGS=()
    [ -n "$rate" ] && KARGS=(--units-per-ms "$rate" ${alone:+--kernel-ms-alone "$alone"})
}
with_sampler share_small_base $((S + 15)) "" $((S + 40)) \
    "$GC" --tag share_small_base share --shape small --seconds "$S" --kernel-ms 2 --depth 8
kernel_args share_small_base
penv "$CFG30"
with_sampler share_small_30 $((S + 15)) 30 $((S + 40)) \
    "${PENV[@]}" "$GC" --tag share_small_30 share --shape small --seconds "$S" --kernel-ms 2 --depth 8 ${KARGS[@]+"${KARGS[@]}"}
penv "$CFG30"
step share_small_30_ptsz $((S + 40)) \
    "${PENV[@]}" "$GC" --tag share_small_30_ptsz share --shape small --seconds 10 --kernel-ms 2 --depth 8 --api ptsz ${KARGS[@]+"${KARGS[@]}"}
with_sampler share_large_base $((S + 15)) "" $((S + 40)) \
    "$GC" --tag share_large_base share --shape large --seconds "$S" --kernel-ms 200
kernel_args share_large_base
penv "$CFG30"
with_sampler share_large_30 $((S + 15)) 30 $((S + 40)) \
    "${PENV[@]}" "$GC" --tag share_large_30 share --shape large --seconds "$S" --kernel-ms 200 ${KARGS[@]+"${KARGS[@]}"}

# ---- 4. two tenants, 30 % and 70 % (two configs, two state dirs: two containers) ------------
# The `work` kernel: its duration stretches when the other tenant holds the GPU, so
# completions measure GPU time received.
T=${GPUCHECK_TENANT_S:-15}
# Calibrate once, alone and un-preloaded; both tenants use the same kernel length.
step tenant_calibration 40 "$GC" --tag tenant_calibration share --kernel work --kernel-ms 2 --calibrate-only
RATE=$(sed -n 's/.*"units_per_ms":\([0-9.][0-9.]*\).*/\1/p' "$WORK/tenant_calibration.out" | head -n1)
ALONE=$(sed -n 's/.*"kernel_ms_measured":\([0-9.][0-9.]*\).*/\1/p' "$WORK/tenant_calibration.out" | head -n1)
TARGS=()
[ -n "$RATE" ] && TARGS=(--units-per-ms "$RATE" ${ALONE:+--kernel-ms-alone "$ALONE"})
# Both loops start on the same wall-clock millisecond, after both processes are up.
START=$(( $(date +%s%3N) + 4000 ))
stop="$WORK/tenants.stop"
step sampler_tenants $((T + 30)) "$GC" --tag sampler_tenants sampler --seconds $((T + 25)) --stop-file "$stop" &
spid=$!
penv "$CFG30"
step tenant_30 $((T + 45)) "${PENV[@]}" "$GC" --tag tenant_30 share --shape small --seconds "$T" --kernel-ms 2 --depth 8 --kernel work \
    ${TARGS[@]+"${TARGS[@]}"} --start-at-ms "$START" &
t30=$!
penv "$CFG70"
step tenant_70 $((T + 45)) "${PENV[@]}" "$GC" --tag tenant_70 share --shape small --seconds "$T" --kernel-ms 2 --depth 8 --kernel work \
    ${TARGS[@]+"${TARGS[@]}"} --start-at-ms "$START" &
t70=$!
wait "$t30" "$t70"
touch "$stop"
wait "$spid"

# ---- 5. per-launch overhead -----------------------------------------------------------------
step overhead_none 60 "$GC" --tag overhead_none overhead --launches 200000
penv "$CFG100"
step overhead_100 60 "${PENV[@]}" "$GC" --tag overhead_100 overhead --launches 200000
penv "$CFG30"
step overhead_30 60 "${PENV[@]}" "$GC" --tag overhead_30 overhead --launches 200000

# ---- verdict --------------------------------------------------------------------------------
"$GC" summarize --file "$RESULTS" >"$WORK/summary.out" 2>>"$LOGS/summarize.err"
rc=$?
cat "$WORK/summary.out" | tee -a "$RESULTS"
echo "gpucheck: results in $RESULTS, logs in $LOGS ($((SECONDS)) s)" >&2
exit "$rc"
