#!/usr/bin/env bash
# Runs every test of the project on a fresh machine: the Rust workspace (unit, component and
# golden tests, property tests) plus the suites that need outside tools, which this script
# installs when they are missing. Usage: scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

section "cargo test --workspace"
cargo test --workspace --all-targets --locked
cargo test --workspace --doc --locked
