#!/usr/bin/env bash
# Installs what hvplace needs on a fresh Debian machine: the Debian packages (etcd,
# libvirt, QEMU, busybox; prometheus for promtool and the dashboard test, which runs its
# own server) and a Python virtual environment with hvplace in it.
# Used by lab/demo.sh (the main job) and .ci/run (the tests). Idempotent.
# Prints the venv's bin directory on its last line.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
PKGS="etcd-server etcd-client libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients
      libvirt-dev pkg-config qemu-system-x86 qemu-utils busybox-static iproute2 cpio
      python3-venv python3-dev gcc procps psmisc prometheus"
missing=""
for p in $PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
    echo "== installing Debian packages:$missing" >&2
    $SUDO apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q $missing >&2
fi

PY=""
for c in python3.13 python3.12 python3.11 python3; do
    if command -v "$c" >/dev/null && "$c" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
        PY="$c"; break
    fi
done
[ -n "$PY" ] || { echo "need Python >= 3.11" >&2; exit 1; }

VENV="${HVPLACE_VENV:-$PWD/.venv}"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV" >&2
"$VENV/bin/python" -m pip install -q --upgrade pip >&2
"$VENV/bin/python" -m pip install -q -e '.[test]' >&2
echo "$VENV/bin"
