#!/usr/bin/env bash
# A hypervisor: libvirtd (Debian's libvirt-daemon-system, which the box carries), the host
# watchdog, the agent's config and unit. Its guests boot the tiny image in
# /var/lib/hvplace/images (the box carries it; `hvplace image add` registers it).
#   hypervisor.sh NAME IP ETCD_IP RACK ZONE [RESERVED_MEMORY_MIB]
set -euo pipefail
name="$1" ip="$2" etcd_ip="$3" rack="$4" zone="$5" reserved="${6:-256}"
if [ -e /dev/kvm ] && grep -qwE 'vmx|svm' /proc/cpuinfo; then
    echo "${name}: guests use KVM"
else
    echo "${name}: no /dev/kvm (no nested virtualisation here): guests use TCG"
fi
dpkg -s libvirt-daemon-system >/dev/null 2>&1 || \
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q -o Dpkg::Options::=--force-confold \
        libvirt-daemon-system
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
metrics_listen = "${ip}:9464"
reserved_memory_mib = ${reserved}
# A lab hypervisor has one vCPU; its tiny guests mostly idle.
cpu_ratio = 8.0

[labels]
rack = "${rack}"
zone = "${zone}"
CONF
hvplace-agent --config /etc/hvplace/agent.toml --check-config
install -m 0644 /opt/hvplace-src/systemd/hvplace-agent.service /etc/systemd/system/
systemctl daemon-reload
systemctl enable hvplace-agent
# A restart adopts the running guests (re-provisioning applies a changed config).
systemctl restart hvplace-agent
