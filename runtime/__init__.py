"""What both daemons run on, apart from the contracts in proto/: the etcd client (etcd.py,
with its channel options in etcd_channel.py), settings loading (settings.py),
systemd's notify protocol (systemd.py) and handing freed heap memory back (heap.py)."""
