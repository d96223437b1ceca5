#!/usr/bin/env bash
# The etcd member: Debian's etcd-server, listening on the lab network. One member; the
# product runs three, which this lab does not need to show failover of hvplace itself.
# A batched create writes more than etcd's default 128 operations in one transaction.
set -euo pipefail
ip="$1"
cat > /etc/default/etcd <<CONF
ETCD_NAME="etcd"
ETCD_DATA_DIR="/var/lib/etcd/default"
ETCD_LISTEN_CLIENT_URLS="http://${ip}:2379,http://127.0.0.1:2379"
ETCD_ADVERTISE_CLIENT_URLS="http://${ip}:2379"
ETCD_LISTEN_PEER_URLS="http://127.0.0.1:2380"
ETCD_INITIAL_ADVERTISE_PEER_URLS="http://127.0.0.1:2380"
ETCD_INITIAL_CLUSTER="etcd=http://127.0.0.1:2380"
ETCD_MAX_TXN_OPS="4096"
CONF
systemctl enable etcd
systemctl restart etcd
