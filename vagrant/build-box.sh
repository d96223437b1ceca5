#!/usr/bin/env bash
# Builds the lab's Vagrant box (libvirt provider) from Debian's packages only, and adds it
# to Vagrant as hvplace/bookworm. Nothing is fetched but Debian packages (debootstrap and
# apt from the mirror this machine's apt uses) and, for the wheelhouse, PyPI packages.
#
#   sudo bash vagrant/build-box.sh            # box at $HVPLACE_BOX_DIR (/var/tmp/hvplace-box)
#
# The box is a qcow2 ext4 root file system without a partition table, booted directly
# from the kernel and initrd shipped beside it (the box's own Vagrantfile points
# vagrant-libvirt at them): no boot loader to install, so no loop device is needed.
# It has systemd, sshd (host keys made at first boot), the vagrant user with Vagrant's
# insecure key and password-less sudo, systemd-networkd (DHCP), rsync for the synced
# folder, and every Debian package that lab/install.sh and the role scripts install,
# so provisioning runs offline. The tiny guest image (hvplace.agent.guest_image) is in
# /var/lib/hvplace/images/tiny for the hypervisors' guests.
#
# Also fills vagrant/.wheels with hvplace's dependencies (pip wheel), which
# provision/install.sh installs from without an index.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"

[ "$(id -u)" = 0 ] || { echo "build-box.sh: run as root (debootstrap, chroot)" >&2; exit 1; }
SUITE="${HVPLACE_BOX_SUITE:-bookworm}"
OUT="${HVPLACE_BOX_DIR:-/var/tmp/hvplace-box}"
NAME="${HVPLACE_BOX_NAME:-hvplace/bookworm}"
SIZE_GB="${HVPLACE_BOX_SIZE_GB:-8}"
PY="${HVPLACE_BOX_PYTHON:-$REPO/.venv/bin/python}"
# The Debian mirror this machine's apt already uses (no host is named here).
MIRROR="${HVPLACE_MIRROR:-}"
if [ -z "$MIRROR" ]; then
    MIRROR="$(grep -hoE '^URIs: *[^ ]+' /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | awk '{print $2}' | grep -v security | head -n 1 || true)"
fi
if [ -z "$MIRROR" ]; then
    MIRROR="$(grep -hE '^deb ' /etc/apt/sources.list 2>/dev/null | awk '{print $2}' | head -n 1 || true)"
fi
[ -n "$MIRROR" ] || { echo "build-box.sh: no Debian mirror in apt's sources; set HVPLACE_MIRROR" >&2; exit 1; }
KEY="$(ls /usr/share/rubygems-integration/all/gems/vagrant-*/keys/vagrant.pub 2>/dev/null | head -n 1 || true)"
[ -n "$KEY" ] || { echo "build-box.sh: Vagrant's insecure key not found (apt-get install vagrant)" >&2; exit 1; }
for tool in debootstrap mkfs.ext4 qemu-img; do
    command -v "$tool" >/dev/null || { echo "build-box.sh: $tool missing (apt-get install debootstrap e2fsprogs qemu-utils)" >&2; exit 1; }
done

# What lab/install.sh installs (its PKGS), read from it so the two cannot drift, plus
# what the roles and the box itself need.
INSTALL_PKGS="$(sed -n '/^PKGS="/,/"$/p' lab/install.sh | tr -d '"' | sed 's/^PKGS=//' | tr -s ' \n' ' ')"
BOX_PKGS="systemd systemd-sysv udev dbus openssh-server sudo rsync ca-certificates
          linux-image-amd64 initramfs-tools kmod libvirt-daemon-system etcd-server
          python3-pip less"
ROOT="$OUT/root"
mkdir -p "$OUT"
t0=$(date +%s)

umount_chroot() {
    for m in dev/pts dev proc sys; do mountpoint -q "$ROOT/$m" && umount -l "$ROOT/$m"; done
    return 0
}
trap umount_chroot EXIT

if [ ! -e "$ROOT/.debootstrap-done" ]; then
    rm -rf "$ROOT"
    echo "== debootstrap $SUITE from $MIRROR" >&2
    debootstrap --variant=minbase --components=main "$SUITE" "$ROOT" "$MIRROR" >&2
    touch "$ROOT/.debootstrap-done"
fi

mount --bind /dev "$ROOT/dev"
mount --bind /dev/pts "$ROOT/dev/pts"
mount -t proc proc "$ROOT/proc"
mount -t sysfs sysfs "$ROOT/sys"
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
# No service starts inside the chroot.
printf '#!/bin/sh\nexit 101\n' > "$ROOT/usr/sbin/policy-rc.d"
chmod +x "$ROOT/usr/sbin/policy-rc.d"
echo "== packages" >&2
chroot "$ROOT" apt-get update -q >&2
# shellcheck disable=SC2086
chroot "$ROOT" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    -o Dpkg::Options::=--force-confold $BOX_PKGS $INSTALL_PKGS >&2
chroot "$ROOT" apt-get clean
rm -f "$ROOT/usr/sbin/policy-rc.d"

echo "== configuration" >&2
echo "vagrant-box" > "$ROOT/etc/hostname"
printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' > "$ROOT/etc/hosts"
printf '/dev/vda\t/\text4\terrors=remount-ro\t0\t1\n' > "$ROOT/etc/fstab"
# Each VM makes its own machine-id (DHCP client ids, journald) and ssh host keys.
: > "$ROOT/etc/machine-id"
# systemd falls back to D-Bus's id when /etc/machine-id is empty: one shared by every VM.
rm -f "$ROOT/var/lib/dbus/machine-id"
ln -s /etc/machine-id "$ROOT/var/lib/dbus/machine-id"
rm -f "$ROOT"/etc/ssh/ssh_host_*
mkdir -p "$ROOT/etc/systemd/system/ssh.service.d"
# ed25519 only: an RSA key takes most of a minute under TCG.
cat > "$ROOT/etc/systemd/system/ssh.service.d/hostkeys.conf" <<'UNIT'
[Service]
ExecStartPre=
ExecStartPre=/bin/sh -c 'test -s /etc/ssh/ssh_host_ed25519_key || ssh-keygen -q -N "" -t ed25519 -f /etc/ssh/ssh_host_ed25519_key'
ExecStartPre=/usr/sbin/sshd -t
UNIT
echo "HostKey /etc/ssh/ssh_host_ed25519_key" > "$ROOT/etc/ssh/sshd_config.d/hostkey.conf"
echo "UseDNS no" > "$ROOT/etc/ssh/sshd_config.d/vagrant.conf"
# DHCP on every wired interface; Vagrant's own 50-vagrant-* files win for the private ones.
cat > "$ROOT/etc/systemd/network/99-dhcp.network" <<'NET'
[Match]
Name=en* eth*

[Network]
DHCP=ipv4

[DHCPv4]
ClientIdentifier=mac
NET
chroot "$ROOT" systemctl enable systemd-networkd ssh >&2
# libvirtd runs on the hypervisors only (hypervisor.sh enables it); etcd on the control VM.
# Prometheus comes with lab/install.sh's packages (promtool for the dashboard tests); the
# lab runs no server of it. e2scrub_reap scans LVM snapshots there are none of, slowly.
chroot "$ROOT" systemctl disable libvirtd etcd prometheus >&2 || true
chroot "$ROOT" systemctl mask e2scrub_reap.service >&2
# The vagrant user: password vagrant, password-less sudo, Vagrant's insecure key (Vagrant
# replaces it with a key of its own at the first `vagrant up`).
chroot "$ROOT" id vagrant >/dev/null 2>&1 || chroot "$ROOT" useradd -m -s /bin/bash vagrant
echo "vagrant:vagrant" | chroot "$ROOT" chpasswd
echo "vagrant ALL=(ALL) NOPASSWD: ALL" > "$ROOT/etc/sudoers.d/vagrant"
chmod 0440 "$ROOT/etc/sudoers.d/vagrant"
install -d -m 0700 "$ROOT/home/vagrant/.ssh"
install -m 0600 "$KEY" "$ROOT/home/vagrant/.ssh/authorized_keys"
chroot "$ROOT" chown -R vagrant:vagrant /home/vagrant/.ssh
echo "root:vagrant" | chroot "$ROOT" chpasswd
# Serial console for `virsh console` and the boot log.
chroot "$ROOT" systemctl enable serial-getty@ttyS0 >&2

echo "== guest image for the hypervisors' VMs" >&2
GUEST=/var/cache/hvplace/guest
[ -s "$GUEST/vmlinuz" ] || "$PY" -m hvplace.agent.guest_image >&2
install -d "$ROOT/var/lib/hvplace/images/tiny" "$ROOT$GUEST"
install -m 0644 "$GUEST/vmlinuz" "$GUEST/initrd.img" "$ROOT/var/lib/hvplace/images/tiny/"
# The agent's KVM probe boots it from its guest cache (agent/hypervisor.py).
install -m 0644 "$GUEST/vmlinuz" "$GUEST/initrd.img" "$GUEST/kernel-package" "$ROOT$GUEST/"

umount_chroot
rm -f "$ROOT/etc/resolv.conf"

echo "== image" >&2
kernel="$(ls "$ROOT"/boot/vmlinuz-* | sort -V | tail -n 1)"
initrd="$(ls "$ROOT"/boot/initrd.img-* | sort -V | tail -n 1)"
BOX="$OUT/box"
rm -rf "$BOX" && mkdir -p "$BOX"
cp "$kernel" "$BOX/vmlinuz"
cp "$initrd" "$BOX/initrd.img"
rm -f "$OUT/root.raw"
mkfs.ext4 -q -F -L root -d "$ROOT" "$OUT/root.raw" "${SIZE_GB}G"
qemu-img convert -O qcow2 "$OUT/root.raw" "$BOX/box.img"
rm -f "$OUT/root.raw"
cat > "$BOX/metadata.json" <<JSON
{"provider": "libvirt", "format": "qcow2", "virtual_size": ${SIZE_GB}}
JSON
cat > "$BOX/Vagrantfile" <<'RUBY'
# hvplace/bookworm: Debian booted directly from the kernel and initrd beside this file.
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |lv|
    lv.kernel = File.join(__dir__, "vmlinuz")
    lv.initrd = File.join(__dir__, "initrd.img")
    lv.cmd_line = "root=/dev/vda rw console=ttyS0 net.ifnames=1"
    lv.disk_bus = "virtio"
  end
end
RUBY
echo "== box file" >&2
tar -C "$BOX" -cf "$OUT/hvplace-bookworm.box" metadata.json Vagrantfile box.img vmlinuz initrd.img
vagrant box add --force --name "$NAME" "$OUT/hvplace-bookworm.box" >&2

echo "== wheelhouse (vagrant/.wheels)" >&2
mkdir -p vagrant/.wheels
"$PY" -m pip wheel -q -w vagrant/.wheels '.[test]' setuptools wheel pip >&2
rm -f vagrant/.wheels/hvplace-*.whl

t1=$(date +%s)
echo "box $NAME built in $((t1 - t0)) s: $OUT/hvplace-bookworm.box ($(du -h "$OUT/hvplace-bookworm.box" | cut -f1))" >&2
echo "$OUT/hvplace-bookworm.box"
