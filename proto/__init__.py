"""Contracts shared by the hvplace daemons, and nothing else: the API schema and the
records kept in etcd (hvplace.proto, v1/), the records' Python twins (records, selectors),
their checks (validation, names, timing) and JSON codec (codec), the etcd keyspace, and
the domain's errors. How a daemon runs (etcd client, settings, systemd) is in runtime/."""
