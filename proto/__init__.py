"""Contracts shared by the hvplace daemons: domain models, etcd keyspace, API schema."""
