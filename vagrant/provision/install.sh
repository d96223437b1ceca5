#!/usr/bin/env bash
# Every VM: the production install step (Debian packages + the /opt/hvplace/venv that the
# units in systemd/ start from), nothing else; the CLI is linked into /usr/local/bin.
# With vagrant/.wheels (build-box.sh fills it) pip installs from there without an index:
# the lab's VMs reach no package registry. The box already has the Debian packages.
set -euo pipefail
export HVPLACE_VENV=/opt/hvplace/venv
wheels=/opt/hvplace-src/vagrant/.wheels
if [ -d "$wheels" ]; then
    export PIP_NO_INDEX=1 PIP_FIND_LINKS="$wheels"
fi
bin="$(bash /opt/hvplace-src/lab/install.sh | tail -n 1)"
for tool in hvplace hvplace-agent hvplace-coordinator; do
    ln -sf "$bin/$tool" "/usr/local/bin/$tool"
done
mkdir -p /etc/hvplace
getent group hvplace >/dev/null || groupadd --system hvplace
