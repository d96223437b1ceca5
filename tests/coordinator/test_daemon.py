"""The coordinator daemon: config precedence and errors, and a whole Coordinator on a real
etcd serving the gRPC API through CoreBackend, with sd_notify and an idempotent shutdown."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest
from coord_support import host, register
from hvplace.coordinator import config
from hvplace.coordinator.daemon import Coordinator
from hvplace.coordinator.store import Store
from hvplace.proto.errors import InvalidInput
from hvplace.proto.records import AdmissionPolicy, Image
from hvplace.proto.v1 import hvplace_pb2 as pb
from hvplace.proto.v1 import hvplace_pb2_grpc as pb_grpc
from support.etcd import EtcdServer, free_port
from support.wait import eventually


def test_config_file_env_flags_precedence(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text(
        'node_name = "c1"\netcd_endpoints = ["10.0.0.1:2379"]\nlisten = "0.0.0.0:7400"\n'
        'anonymous_role = "viewer"\n'
        '[cluster]\nlease_ttl_s = 10\nfence_after_s = 6\nadmission_policy = "refuse"\n'
    )
    cfg = config.load(f, env={"HVPLACE_LISTEN": "127.0.0.1:1", "HVPLACE_ENDPOINT": "cli's"})
    assert cfg.node_name == "c1" and cfg.etcd_endpoints == ("10.0.0.1:2379",)
    assert cfg.listen == "127.0.0.1:1"  # env over file; other HVPLACE_ variables ignored
    assert (
        cfg.cluster().lease_ttl_s == 10 and cfg.cluster().admission_policy is AdmissionPolicy.REFUSE
    )
    cfg = config.load(f, env={}, overrides={"etcd_endpoints": "a:1,b:2", "session_ttl_s": 3.0})
    assert cfg.etcd_endpoints == ("a:1", "b:2") and cfg.session_ttl_s == 3.0
    assert "lease_ttl 10.0s" in config.budget_text(cfg.cluster())
    assert "watchdog_timeout 4.0s (derived)" in config.budget_text(cfg.cluster())
    assert cfg.cluster().default_image is None
    f.write_text('anonymous_role = "viewer"\n[cluster]\ndefault_image_kernel = "/boot/vmlinuz"\n')
    cfg = config.load(f, env={"HVPLACE_DEFAULT_IMAGE_CMDLINE": "console=ttyS0"})
    assert cfg.cluster().default_image == Image(kernel="/boot/vmlinuz", cmdline="console=ttyS0")
    cfg = config.load(f, env={"HVPLACE_IMAGE_ROOTS": "/boot, /srv/images"})
    assert cfg.cluster().image_roots == ("/boot", "/srv/images")
    with pytest.raises(InvalidInput, match="outside the cluster's image roots"):
        config.load(f, env={"HVPLACE_IMAGE_ROOTS": "/srv/images"})


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("bogus = 1\n", {}, "unknown key(s) bogus"),
        ("[cluster]\nttl = 1\n", {}, "unknown [cluster] key(s) ttl"),
        ("session_ttl_s = 'x'\n", {}, "session_ttl_s: expected"),
        ("", {"HVPLACE_RESYNC_S": "soon"}, "HVPLACE_RESYNC_S"),
        ("[cluster]\nfence_after_s = 6\n", {}, "unsafe timing budget"),
        ("[cluster]\nwatchdog_timeout_s = 2.5\n", {}, "lower watchdog_timeout_s to at most 2"),
        ("", {"HVPLACE_WATCHDOG_TIMEOUT_S": "-1"}, "watchdog_timeout_s -1.0 must be between"),
        ("admission_policy = 'maybe'\n", {}, "admission_policy 'maybe'"),
        ("listen = 'nowhere'\n", {}, "listen 'nowhere' must be host:port"),
        ("node_name = 'Bad Name!'\n", {}, "node name"),
        ("", {"HVPLACE_LEADER_SELF_CHECKS": "maybe"}, "expected true or false"),
        ("leader_self_checks = 1\n", {}, "leader_self_checks: expected true or false"),
        ("[cluster]\ndefault_image_kernel = 'vmlinuz'\n", {}, "must be absolute"),
        ("", {"HVPLACE_DEFAULT_IMAGE_KERNEL": "/boot/../etc/shadow"}, "'..'"),
        ("default_image_cmdline = 'quiet'\n", {}, "neither a kernel nor a disk"),
        ("etcd_endpoints = ['ftp://e:1']\n", {}, "scheme must be http or https"),
        ("etcd_endpoints = ['e:1', 'bad_name:2']\n", {}, "etcd endpoint 'bad_name:2'"),
        ("etcd_endpoints = ['http://e:1', 'https://f:1']\n", {}, "mix http:// and https://"),
        ("etcd_ca = '/ca.pem'\n", {}, "the etcd endpoints must be https://"),
        ("etcd_endpoints = ['https://e:1']\netcd_key = '/k'\n", {}, "give both or neither"),
    ],
)
def test_config_errors_name_the_key(
    tmp_path: Path, text: str, env: dict[str, str], message: str
) -> None:
    f = tmp_path / "c.toml"
    f.write_text(text)
    with pytest.raises(InvalidInput) as info:
        config.load(f, env=env)
    assert message in str(info.value)


def test_coordinator_refuses_to_start_with_a_watchdog_too_slow_to_fence(tmp_path: Path) -> None:
    """A dead agent's host would reset 3 + 3 + 0.5 s after its last renewal, after its VMs
    may be re-placed (5 + 0.5 s): the coordinator says so and does not start."""
    f = tmp_path / "c.toml"
    f.write_text("[cluster]\nlease_ttl_s = 5\nfence_after_s = 3\nwatchdog_timeout_s = 3\n")
    out = subprocess.run(
        [sys.executable, "-m", "hvplace.coordinator", "--config", str(f)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "unsafe timing budget" in out.stderr
    assert "lower watchdog_timeout_s to at most 2" in out.stderr


async def test_coordinator_serves_the_api_and_places(
    etcd: EtcdServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    notify = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify))
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify))
    cfg = config.CoordinatorConfig(
        node_name="c1",
        etcd_endpoints=(etcd.endpoint,),
        listen=f"127.0.0.1:{free_port()}",
        metrics_listen=f"127.0.0.1:{free_port()}",
        session_ttl_s=2,
        anonymous_role="admin",
    )
    store = await Store.connect([etcd.endpoint], timeout=5)
    await register(store, host("hv1"))
    try:
        async with Coordinator(cfg) as c:
            assert sock.recv(100) == b"READY=1"
            assert c.election is not None
            await eventually(lambda: c.election is not None and c.election.is_leader)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{c.api_port}") as ch:
                vms = pb_grpc.VMServiceStub(ch)
                resp = await vms.CreateVMs(
                    pb.CreateVMsRequest(
                        request_id="r1",
                        vms=[
                            pb.VM(
                                scope="acme",
                                name="a",
                                resources=pb.Resources(vcpus=1, memory_mib=512),
                                image=pb.Image(kernel="/boot/vmlinuz"),
                            )
                        ],
                    )
                )
                assert resp.vms[0].status.phase == "scheduled"
                assert resp.vms[0].status.host == "hv1"
            url = f"http://127.0.0.1:{c.metrics_port}/metrics"
            body = await asyncio.to_thread(lambda: urllib.request.urlopen(url).read())
            assert b"hvplace_leader 1.0" in body
            assert b"hvplace_placement_latency_seconds_count" in body
            await c.shutdown()
            await c.shutdown()  # idempotent
        assert sock.recv(100) == b"STOPPING=1"
        # Resigned: no election key left behind.
        assert (await store.list_prefix("/hvplace/v1/election/"))[0] == []
    finally:
        sock.close()
        await store.close()
