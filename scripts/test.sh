#!/usr/bin/env bash
# Runs every test of the project on a fresh machine: the Rust workspace (unit, component and
# golden tests, property tests) plus the suites that need outside tools, which this script
# installs when they are missing. Usage: scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

# --- BEGIN tools: Prometheus (metrics tests) ------------------------------------------------
# gm-metrics' tests check the exposition with `promtool check metrics` and scrape a live
# server with a real Prometheus. Both come from Debian's `prometheus` package; install it only
# when either binary is missing, so reruns do nothing here.
section "tools: prometheus + promtool"
if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
  echo "prometheus and promtool already installed: $(command -v prometheus), $(command -v promtool)"
else
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  # --no-install-recommends: the exporters and web assets are not needed by the tests.
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus
  # The package may start its own service where an init system runs; the tests start their
  # own server on a random port, so a running system instance does no harm.
  command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || {
    echo "installing Debian's prometheus package did not provide prometheus and promtool" >&2
    exit 1
  }
fi
# --- END tools: Prometheus ---------------------------------------------------------------------

# --- BEGIN tools: C compiler and binutils (limiter tests) ------------------------------------
# The limiter's tests compile the fake libcuda.so.1 / libnvidia-ml.so.1 and the C probe with
# `cc`, and check libvcuda.so's exports with `nm` and `readelf`.
section "tools: cc, nm, readelf"
if command -v cc >/dev/null 2>&1 && command -v nm >/dev/null 2>&1 && command -v readelf >/dev/null 2>&1; then
  echo "cc, nm and readelf already installed"
else
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends gcc libc6-dev binutils
fi
# --- END tools: C compiler and binutils ---------------------------------------------------------

section "cargo test --workspace"
cargo test --workspace --all-targets --locked
cargo test --workspace --doc --locked
