"""A lab on libvirt's test:/// driver: no root, no namespaces; etcd on loopback."""

from __future__ import annotations

from hvplace.lab.control import Lab
from hvplace.lab.state import LabSettings


def test_a_test_lab_needs_no_namespaces(settings: LabSettings) -> None:
    lab = Lab(settings)
    try:
        state = lab.up(2, "test", only="etcd")
        assert [h.libvirt_uri for h in state.hosts.values()] == [
            f"test://{settings.host_dir(name)}/node.xml" for name in ("h1", "h2")
        ]
        assert all(h.netns is None and h.supervisor is None for h in state.hosts.values())
        assert state.bridge is None
        assert len(state.etcd_endpoints) == 1
        assert state.etcd_endpoints[0].startswith("http://127.0.0.1:")
        rows = lab.status()
        assert [(r.component, r.name, r.alive) for r in rows] == [
            ("etcd", "etcd", True),
            ("host", "h1", None),
            ("host", "h2", None),
        ]
        assert rows[1].detail == "test NOT registered"
    finally:
        lab.down()
    assert not settings.state_dir.exists()
