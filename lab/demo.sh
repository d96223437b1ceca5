#!/usr/bin/env bash
# The main job, for a newcomer on a fresh Debian machine: install what is missing, then
# place the sample cluster (lab/sample-cluster.toml) with the real engine, print the
# placement table and why anything stays pending, and show the plan if host hv-a1 failed.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="$(bash lab/install.sh | tail -n 1)"
export PATH="$BIN:$PATH"
hvplace simulate --cluster lab/sample-cluster.toml --fail hv-a1
echo
echo "Next: edit lab/sample-cluster.toml and run again: $BIN/hvplace simulate --cluster lab/sample-cluster.toml [--fail HOST] [--json]"
