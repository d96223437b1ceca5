#!/usr/bin/env bash
# A private libvirtd for the Vagrant lab, in a network and mount namespace of its own:
# the lab's bridges, DHCP and VM addresses never touch the machine's own network, and
# the system's /run/libvirt, /etc/libvirt and /var/lib/libvirt (which other tools and
# the project's tests use) are left alone (ours are bind-mounted over them inside).
#
#   bash vagrant/netns.sh start              # netns + supervisor + virtlogd + libvirtd
#   bash vagrant/netns.sh run vagrant up     # any command inside (vagrant, virsh, ...)
#   bash vagrant/netns.sh pid                # the supervisor's PID (nsenter -t PID -m -n)
#   bash vagrant/netns.sh stop               # every process in the netns, then the netns
#
# State (libvirt's storage pool with the uploaded box, logs, sockets) lives under
# $HVPLACE_VAGRANT_STATE (default /var/tmp/hvplace-vagrant). Run as root.
set -euo pipefail
NS="${HVPLACE_VAGRANT_NETNS:-hvplace-vagrant}"
STATE="${HVPLACE_VAGRANT_STATE:-/var/tmp/hvplace-vagrant}"
PIDFILE="$STATE/supervisor.pid"

alive() { [ -s "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }
inside() { nsenter -t "$(cat "$PIDFILE")" -m -n -- "$@"; }

start() {
    if alive && inside virsh -c qemu:///system version >/dev/null 2>&1; then
        return 0
    fi
    mkdir -p "$STATE"/{run,lib,log,cache,etc}
    cat > "$STATE/etc/qemu.conf" <<'CONF'
user = "root"
group = "root"
security_driver = "none"
CONF
    cat > "$STATE/etc/libvirtd.conf" <<'CONF'
unix_sock_group = "root"
unix_sock_rw_perms = "0700"
auth_unix_ro = "none"
auth_unix_rw = "none"
CONF
    ip netns list | grep -qw "$NS" || ip netns add "$NS"
    ip -n "$NS" link set lo up
    cat > "$STATE/supervisor.sh" <<SH
set -eu
mount --bind $STATE/run /run
mount --bind $STATE/lib /var/lib/libvirt
mount --bind $STATE/log /var/log/libvirt
mount --bind $STATE/cache /var/cache/libvirt
mount --bind $STATE/etc /etc/libvirt
touch $STATE/ready
exec sleep infinity
SH
    rm -f "$STATE/ready"
    setsid ip netns exec "$NS" unshare -m --propagation private sh "$STATE/supervisor.sh" \
        > "$STATE/supervisor.log" 2>&1 < /dev/null &
    echo $! > "$PIDFILE"
    for _ in $(seq 100); do [ -e "$STATE/ready" ] && break; sleep 0.1; done
    [ -e "$STATE/ready" ] || { cat "$STATE/supervisor.log" >&2; exit 1; }
    # `ip netns exec` then `unshare` exec in place, so $! is the sleeping supervisor.
    inside virtlogd -d
    inside libvirtd -d
    for _ in $(seq 300); do
        inside virsh -c qemu:///system version >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    echo "netns.sh: libvirtd in $NS is not answering" >&2
    exit 1
}

stop() {
    if ip netns list | grep -qw "$NS"; then
        # Everything in the namespace was started through this script: QEMU, dnsmasq,
        # libvirtd, virtlogd, the supervisor.
        pids="$(ip netns pids "$NS" || true)"
        [ -z "$pids" ] || kill $pids 2>/dev/null || true
        for _ in $(seq 50); do [ -z "$(ip netns pids "$NS")" ] && break; sleep 0.2; done
        pids="$(ip netns pids "$NS" || true)"
        [ -z "$pids" ] || kill -9 $pids 2>/dev/null || true
        ip netns del "$NS"
    fi
    rm -f "$PIDFILE" "$STATE/ready"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    pid) alive && cat "$PIDFILE" ;;
    run) shift; alive || { echo "netns.sh: not started (netns.sh start)" >&2; exit 1; }; inside "$@" ;;
    *) echo "usage: netns.sh start|stop|pid|run CMD..." >&2; exit 2 ;;
esac
