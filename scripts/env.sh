# Shared settings for the project scripts. Source it; do not run it.
# Caches live outside the repository so reruns are fast and the tree stays clean.
export GM_CACHE="${GM_CACHE:-$HOME/.cache/gpu-manager-rs}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$GM_CACHE/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
mkdir -p "$GM_CACHE"

# Print a section header with elapsed seconds since the script started.
GM_T0=${GM_T0:-$(date +%s)}
section() { printf '\n== %s (t=%ss)\n' "$*" "$(( $(date +%s) - GM_T0 ))"; }
