#!/usr/bin/env bash
# A coordinator VM: its config and the packaged systemd unit. Both VMs campaign; one leads.
set -euo pipefail
name="$1" ip="$2" etcd_ip="$3"
cat > /etc/hvplace/coordinator.toml <<CONF
node_name = "${name}"
etcd_endpoints = ["http://${etcd_ip}:2379"]
listen = "${ip}:7420"
metrics_listen = "${ip}:9420"
auth_file = "/etc/hvplace/auth.toml"
CONF
# An admin token for this coordinator's API (only its SHA-256 is kept in auth.toml).
[ -s /etc/hvplace/auth.toml ] || hvplace auth add-token admin --role admin \
    --auth-file /etc/hvplace/auth.toml --out /etc/hvplace/admin.token
install -m 0644 /opt/hvplace-src/systemd/hvplace-coordinator.service /etc/systemd/system/
systemctl daemon-reload
systemctl enable --now hvplace-coordinator
