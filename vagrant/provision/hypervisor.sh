#!/usr/bin/env bash
# A hypervisor VM: libvirtd (from install.sh), the agent's config and unit, the guest image.
set -euo pipefail
name="$1" ip="$2" etcd_ip="$3" rack="$4" zone="$5"
test -e /dev/kvm || echo "warning: no /dev/kvm in ${name}: is nested KVM enabled on the machine?" >&2
systemctl enable --now libvirtd
# The host watchdog the agent pets while its lease is fresh (README: fencing).
install -m 0644 /opt/hvplace-src/systemd/modules-load.d/hvplace.conf /etc/modules-load.d/
install -m 0644 /opt/hvplace-src/systemd/modprobe.d/hvplace.conf /etc/modprobe.d/
modprobe softdog
cat > /etc/hvplace/agent.toml <<CONF
host = "${name}"
etcd_endpoints = ["http://${etcd_ip}:2379"]
libvirt_uri = "qemu:///system"
state_dir = "/var/lib/hvplace-agent"
watchdog_device = "/dev/watchdog"

[labels]
rack = "${rack}"
zone = "${zone}"
CONF
install -m 0644 /opt/hvplace-src/systemd/hvplace-agent.service /etc/systemd/system/
systemctl daemon-reload
systemctl enable --now hvplace-agent
