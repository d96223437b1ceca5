"""Leader election on a real etcd: in-process campaigns, and two `hvplace-coordinator`
processes where the leader is frozen (SIGSTOP) past its TTL, replaced, and fenced on waking."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest
from hvplace.coordinator.election import Election
from hvplace.coordinator.store import Fence, FenceLost, Store
from hvplace.proto import keyspace
from hvplace.proto.v1 import hvplace_pb2 as pb
from hvplace.proto.v1 import hvplace_pb2_grpc as pb_grpc
from support.etcd import EtcdServer, free_port
from support.wait import eventually, eventually_blocking


async def test_one_leader_then_failover_on_resign(etcd: EtcdServer) -> None:
    store = await Store.connect([etcd.endpoint], timeout=5)
    led: list[tuple[str, Fence]] = []

    def work(name: str):  # type: ignore[no-untyped-def]
        async def run(fence: Fence) -> None:
            led.append((name, fence))
            await asyncio.Event().wait()

        return run

    a = Election(store, "a", 2, work("a"))
    b = Election(store, "b", 2, work("b"))
    ta = asyncio.create_task(a.run())
    await eventually(lambda: a.is_leader)
    tb = asyncio.create_task(b.run())
    # b has campaigned and sees a's key: it follows, and a's key is older than b's.
    await eventually(lambda: b.leader == "a")
    assert not b.is_leader
    with pytest.raises(Exception, match="not the leader"):
        b.require_fence()
    a.stop()
    await ta
    # b's work starts in a task of its own: wait for it, not just for the flag.
    await eventually(lambda: len(led) == 2, 5)
    assert b.is_leader
    assert [n for n, _ in led] == ["a", "b"]
    assert led[1][1].revision > led[0][1].revision
    b.stop()
    await tb
    await store.close()


async def test_write_rejected_by_fence_steps_down(etcd: EtcdServer) -> None:
    store = await Store.connect([etcd.endpoint], timeout=5)
    other = await Store.connect([etcd.endpoint], timeout=5)
    go = asyncio.Event()
    errors: list[BaseException] = []

    async def work(fence: Fence) -> None:
        await go.wait()
        if errors:  # the second term only leads
            await asyncio.Event().wait()
        try:
            await store.commit([], {keyspace.ROOT + "test/x": b"1"}, fence=fence)
        except FenceLost as e:
            errors.append(e)
            raise

    e = Election(store, "a", 5, work)
    task = asyncio.create_task(e.run())
    await eventually(lambda: e.is_leader)
    fence = e.fence
    assert fence is not None
    # etcd drops the leader's key behind its back (as when its lease expired while frozen).
    await other.delete(fence.key)
    go.set()
    await eventually(lambda: bool(errors))
    await eventually(lambda: e.fence is not None and e.fence != fence, 5)  # campaigned again
    assert e.terms == 2
    assert await store.get(keyspace.ROOT + "test/x") is None
    e.stop()
    await task
    await store.close()
    await other.close()


def _start(
    etcd: EtcdServer,
    name: str,
    log: Path,
    port: int = 0,
    self_checks: bool = True,
    metrics_port: int = 0,
) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["HVPLACE_LEADER_SELF_CHECKS"] = "true" if self_checks else "false"
    cmd = [
        sys.executable,
        "-m",
        "hvplace.coordinator",
        "--config",
        "/dev/null",
        "--node-name",
        name,
        "--etcd",
        etcd.endpoint,
        "--listen",
        f"127.0.0.1:{port or free_port()}",
        "--metrics-listen",
        f"127.0.0.1:{metrics_port}" if metrics_port else "",
        "--session-ttl",
        "2",
        "--anonymous-role",
        "admin",
        "--log-level",
        "INFO",
    ]
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)


def _leader(etcd: EtcdServer) -> str:
    out = etcd.etcdctl(
        "get", "--prefix", keyspace.ELECTION, "--sort-by=CREATE", "--order=ASCEND", "--limit=1"
    ).splitlines()
    return out[1] if len(out) > 1 else ""


def _data_keys(etcd: EtcdServer, revision: int = 0) -> dict[str, int]:
    """Every hvplace key but the election's, with its mod revision (at `revision`)."""
    args = ["get", "--prefix", keyspace.ROOT, "--keys-only", "-w", "json"]
    if revision:
        args.append(f"--rev={revision}")
    kvs = json.loads(etcd.etcdctl(*args)).get("kvs", [])
    found = {base64.b64decode(kv["key"]).decode(): int(kv["mod_revision"]) for kv in kvs}
    return {k: r for k, r in found.items() if not k.startswith(keyspace.ELECTION)}


def _revision(etcd: EtcdServer) -> int:
    return int(json.loads(etcd.etcdctl("get", "/", "-w", "json"))["header"]["revision"])


def _fence_rejections(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    for line in text.splitlines():
        if line.startswith("hvplace_fence_rejections_total "):
            return float(line.split()[1])
    raise AssertionError("no hvplace_fence_rejections_total in the metrics")


@pytest.mark.parametrize("self_checks", [True, False], ids=["self-checks", "fence-only"])
def test_sigstopped_leader_is_replaced_and_steps_down(
    etcd: EtcdServer, tmp_path: Path, self_checks: bool
) -> None:
    """SIGSTOP the leader past its TTL: the standby takes over. SIGCONT it and ask it to
    write. With its self checks (the default) it has stepped down on waking, before any
    write; with them off, its write is rejected by etcd's fence (the log line and the
    metric say so) and it steps down. Either way nothing it tried to write lands: every
    key but the election's is as it was at the revision before SIGCONT."""
    logs = {n: tmp_path / f"{n}.log" for n in ("c1", "c2")}
    port, metrics_port = free_port(), free_port()
    procs = {"c1": _start(etcd, "c1", logs["c1"], port, self_checks, metrics_port)}
    try:
        eventually_blocking(lambda: _leader(etcd) == "c1")
        procs["c2"] = _start(etcd, "c2", logs["c2"], 0, self_checks)
        eventually_blocking(lambda: "ready" in logs["c2"].read_text())
        os.kill(procs["c1"].pid, signal.SIGSTOP)
        eventually_blocking(lambda: _leader(etcd) == "c2", 10)
        # c2's leader work has begun (it has nothing to write: the config is c1's).
        eventually_blocking(lambda: "elected leader" in logs["c2"].read_text(), 10)
        before = _revision(etcd)
        os.kill(procs["c1"].pid, signal.SIGCONT)
        # The woken c1's next write: a create through its own API.
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.VMServiceStub(channel)
            request = pb.CreateVMsRequest(
                request_id="stale",
                vms=[pb.VM(scope="t", name="stale-write", image=pb.Image(kernel="/boot/vmlinuz"))],
            )
            with pytest.raises(grpc.RpcError) as refused:
                stub.CreateVMs(request, timeout=10)
        assert refused.value.code() in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.ABORTED,
            grpc.StatusCode.FAILED_PRECONDITION,
        ), refused.value.details()
        eventually_blocking(lambda: "lost leadership" in logs["c1"].read_text(), 10)
        text = logs["c1"].read_text()
        if self_checks:
            assert "not renewed" in text or "expired in etcd: lost" in text
            assert "rejected by the fence" not in text
            assert _fence_rejections(metrics_port) == 0
        else:
            rejected = text.index("a write was rejected by the fence: stepping down")
            assert text.index("lost leadership", rejected) > rejected
            assert _fence_rejections(metrics_port) >= 1
        # Nothing of the stale write landed: no key but the election's changed, was
        # added or was deleted after the revision read before SIGCONT.
        assert etcd.etcdctl("get", "--prefix", "--keys-only", keyspace.VMS).strip() == ""
        assert etcd.etcdctl("get", "--keys-only", keyspace.request("stale")).strip() == ""
        assert keyspace.CONFIG in _data_keys(etcd, before)  # written by c1 as leader
        assert _data_keys(etcd) == _data_keys(etcd, before)

        # c1 campaigns again: its new key is there, behind c2's, and c2 still leads.
        def candidates() -> list[str]:
            out = etcd.etcdctl("get", "--prefix", keyspace.ELECTION, "--print-value-only")
            return sorted(out.split())

        def since_lost() -> str:
            text = logs["c1"].read_text()
            return text[text.rindex("lost leadership") :]

        eventually_blocking(
            lambda: candidates() == ["c1", "c2"] and "campaigning as" in since_lost(),
            20,
            what="c1 campaigning again",
        )
        assert _leader(etcd) == "c2"
        assert "elected leader" not in since_lost()
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
                os.kill(p.pid, signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(p.pid, signal.SIGKILL)
                p.wait()
    assert procs["c2"].returncode == 0, logs["c2"].read_text()[-2000:]


def test_cli_passes_over_a_standby_but_reports_the_leaders_capacity_error(
    etcd: EtcdServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """UNAVAILABLE means "not the leader" and "no capacity" alike; only the first sends the
    CLI to the next coordinator, whichever order the endpoints come in."""
    from hvplace.cli import main as cli

    ports = {"c1": free_port(), "c2": free_port()}
    procs = {"c1": _start(etcd, "c1", tmp_path / "c1.log", ports["c1"])}
    try:
        eventually_blocking(lambda: _leader(etcd) == "c1")
        procs["c2"] = _start(etcd, "c2", tmp_path / "c2.log", ports["c2"])
        eventually_blocking(lambda: "ready" in (tmp_path / "c2.log").read_text())
        create = ["vm", "create", "big", "--scope", "t", "--memory", "900000", "--atomic"]
        create += ["--kernel", "/boot/vmlinuz"]
        for order in (("c1", "c2"), ("c2", "c1")):
            endpoints = ",".join(f"127.0.0.1:{ports[n]}" for n in order)
            code = cli.main(["--endpoint", endpoints, "--timeout", "10", *create])
            err = capsys.readouterr().err
            assert code == cli.EXIT_ERROR
            assert "atomic batch of 1 VM(s) not created" in err, (order, err)
            assert "not the leader" not in err, (order, err)
        code = cli.main(["--endpoint", f"127.0.0.1:{ports['c2']}", "--timeout", "10", *create])
        assert code == cli.EXIT_ERROR and "not the leader" in capsys.readouterr().err
    finally:
        for p in procs.values():
            p.kill()
            p.wait()
