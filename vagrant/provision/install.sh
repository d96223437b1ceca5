#!/usr/bin/env bash
# Every VM: the production install step (Debian packages + the /opt/hvplace/venv that the
# units in systemd/ start from), nothing else; the CLI is linked into /usr/local/bin.
set -euo pipefail
export HVPLACE_VENV=/opt/hvplace/venv
bin="$(bash /opt/hvplace-src/lab/install.sh | tail -n 1)"
for tool in hvplace hvplace-agent hvplace-coordinator; do
    ln -sf "$bin/$tool" "/usr/local/bin/$tool"
done
mkdir -p /etc/hvplace
getent group hvplace >/dev/null || groupadd --system hvplace
