"""What both daemons run on, apart from the contracts in proto/: the etcd client (etcd.py,
with its channel options in etcd_channel.py), settings loading (settings.py) and
systemd's notify protocol (systemd.py)."""
