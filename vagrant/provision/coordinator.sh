#!/usr/bin/env bash
# A coordinator: its config and the packaged systemd unit. Every coordinator campaigns;
# one leads. Several on one VM (the lab's control VM) each get their own config and a
# copy of the unit: hvplace-coordinator (API port 7420) and hvplace-coordinator-NAME.
#   coordinator.sh NAME IP ETCD_IP [API_PORT [METRICS_PORT]]
set -euo pipefail
name="$1" ip="$2" etcd_ip="$3" api_port="${4:-7420}" metrics_port="${5:-9420}"
unit=hvplace-coordinator conf=/etc/hvplace/coordinator.toml
if [ "$api_port" != 7420 ]; then
    unit="hvplace-coordinator-${name}" conf="/etc/hvplace/coordinator-${name}.toml"
fi
# Lease and fence times for VMs that may run under TCG on a loaded machine: generous, and
# still a watchdog reset well before the coordinator re-places a lost host's VMs.
cat > "$conf" <<CONF
node_name = "${name}"
etcd_endpoints = ["http://${etcd_ip}:2379"]
listen = "${ip}:${api_port}"
metrics_listen = "${ip}:${metrics_port}"
auth_file = "/etc/hvplace/auth.toml"
session_ttl_s = 15.0

[cluster]
lease_ttl_s = 30.0
fence_after_s = 12.0
failover_delay_s = 1.0
image_roots = "/var/lib/hvplace/images"
CONF
# An admin token for the API (only its SHA-256 is kept in auth.toml, which the units'
# dynamic user reads through the hvplace group).
[ -s /etc/hvplace/auth.toml ] || hvplace auth add-token admin --role admin \
    --auth-file /etc/hvplace/auth.toml --out /etc/hvplace/admin.token
chgrp hvplace /etc/hvplace/auth.toml "$conf"
chmod 0640 /etc/hvplace/auth.toml "$conf"
hvplace-coordinator --config "$conf" --check-config
sed "s|/etc/hvplace/coordinator.toml|${conf}|" /opt/hvplace-src/systemd/hvplace-coordinator.service \
    > "/etc/systemd/system/${unit}.service"
systemctl daemon-reload
systemctl enable --now "$unit"
