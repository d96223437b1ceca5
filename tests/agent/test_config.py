"""The agent's settings: TOML < HVPLACE_AGENT_* < flags, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from hvplace.agent import config
from hvplace.proto.errors import InvalidInput


def test_file_then_environment_then_flags(tmp_path: Path) -> None:
    f = tmp_path / "agent.toml"
    f.write_text(
        'host = "hv1"\netcd_endpoints = ["http://10.0.0.1:2379"]\nlease_ttl = 4\n'
        'cpu_ratio = 8\nimages_dir = "/srv/images"\n[labels]\nrack = "r1"\n'
    )
    env = {"HVPLACE_AGENT_LABELS": "rack=r2,zone=z1", "HVPLACE_ENDPOINT": "ignored"}
    cfg = config.load(f, env=env, overrides={"domain_type": "qemu"})
    assert cfg.host == "hv1" and cfg.etcd_endpoints == ("http://10.0.0.1:2379",)
    assert cfg.lease_ttl == 4.0 and cfg.cpu_ratio == 8.0
    assert cfg.images == Path("/srv/images")
    assert cfg.labels == {"rack": "r2", "zone": "z1"}  # environment over file
    assert cfg.domain_type == "qemu"  # flag over both
    budget = config.cluster_config(None, cfg)
    assert (budget.lease_ttl_s, budget.fence_after_s) == (4.0, 2.4)


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("bogus = 1\n", {}, "unknown key(s) bogus"),
        ("", {"HVPLACE_AGENT_NOPE": "1"}, "no agent setting 'nope'"),
        ("cpu_ratio = 'lots'\n", {}, "agent config cpu_ratio: expected"),
        ("reserved_memory_mib = 1.5\n", {}, "reserved_memory_mib: expected an integer"),
        ("domain_type = 'xen'\n", {}, "domain_type 'xen'"),
        ("host = 'a/b'\n", {}, "host name"),
        ("x = [\n", {}, "is not valid TOML"),
        ("etcd_endpoints = ['ftp://e:1']\n", {}, "scheme must be http or https"),
        ("etcd_endpoints = ['e:1', 'bad_name:2']\n", {}, "etcd endpoint 'bad_name:2'"),
        ("etcd_endpoints = ['http://e:1', 'https://f:1']\n", {}, "mix http:// and https://"),
        ("etcd_ca = '/ca.pem'\n", {}, "the etcd endpoints must be https://"),
        ("etcd_endpoints = ['https://e:1']\netcd_key = '/k'\n", {}, "give both or neither"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, text: str, env: dict[str, str], message: str) -> None:
    f = tmp_path / "agent.toml"
    f.write_text(text)
    with pytest.raises(InvalidInput) as info:
        config.load(f, env=env)
    assert message in str(info.value)


def test_etcd_endpoints_and_tls_keys(tmp_path: Path) -> None:
    f = tmp_path / "agent.toml"
    f.write_text(
        "etcd_endpoints = ['https://etcd-1.example.org:2379', 'https://[fd00::2]']\n"
        "etcd_ca = '/etc/hvplace/etcd-ca.pem'\n"
    )
    cfg = config.load(f, env={"HVPLACE_AGENT_ETCD_CERT": "/c.pem", "HVPLACE_AGENT_ETCD_KEY": "/k"})
    assert cfg.etcd_endpoints == ("https://etcd-1.example.org:2379", "https://[fd00::2]")
    assert cfg.etcd_tls.ca == Path("/etc/hvplace/etcd-ca.pem")
    assert (cfg.etcd_tls.cert, cfg.etcd_tls.key) == (Path("/c.pem"), Path("/k"))
