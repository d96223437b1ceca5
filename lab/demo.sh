#!/usr/bin/env bash
# The main job, for a newcomer on a fresh Debian machine (as root): install what is
# missing, then `hvplace lab demo`: start a lab of four namespaced hosts with real QEMU
# guests, place a dozen VMs under rules, kill a host and show the failover.
# The lab stays up afterwards; `sudo hvplace lab down` removes it.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then exec sudo bash "$0" "$@"; fi
echo "== installing what is missing (Debian packages, Python venv in .venv)"
BIN="$(bash lab/install.sh | tail -n 1)"
export PATH="$BIN:$PATH"
exec hvplace lab demo --replace "$@"
