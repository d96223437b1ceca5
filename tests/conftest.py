"""Fixtures shared by every test folder: a real etcd server; hypothesis' profiles."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import settings
from support.etcd import EtcdCluster, EtcdServer

# The test command runs the same examples every time (`ci`): a red CI run is a regression,
# never a draw. `HVPLACE_HYPOTHESIS=explore` draws new examples (and more of them) to
# look for bugs; a failure found so is then pinned with @example or a table test.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, max_examples=1000)
settings.load_profile(os.environ.get("HVPLACE_HYPOTHESIS", "ci"))


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[EtcdServer]:
    """One etcd for the session; tests that kill or restart etcd use `own_etcd`."""
    server = EtcdServer()
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def etcd(etcd_server: EtcdServer) -> Iterator[EtcdServer]:
    """The session's etcd, emptied of hvplace keys before and after the test."""
    etcd_server.etcdctl("del", "--prefix", "/hvplace/")
    yield etcd_server
    if etcd_server.proc is not None and etcd_server.proc.poll() is None:
        etcd_server.etcdctl("del", "--prefix", "/hvplace/")


@pytest.fixture
def own_etcd() -> Iterator[EtcdServer]:
    """A private etcd the test may kill -9, SIGSTOP or restart."""
    server = EtcdServer()
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def etcd_cluster() -> Iterator[EtcdCluster]:
    """A private 3-member etcd cluster whose members the test may kill -9 and restart,
    with the election timeout the README recommends (500 ms: a dead leader is replaced
    in 0.6-1.5 s, well inside an agent's default fence window)."""
    cluster = EtcdCluster(3, election_timeout_ms=500)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()
