"""Scale check of the coordinator: loads N hosts and M VMs with their assignments into a private
etcd, then starts a coordinator (child process, gRPC API on) and reports one JSON line:

  rebuild_s       cold start: from the coordinator's start to ready (its list of etcd), goal <= 3
  rebuild_cpu_s   the CPU time the coordinator spent on it (the rest is waiting for etcd, or
                  for a core on a loaded machine)
  rss_mb          the leader's RSS after the creates, goal <= 300
  create_p50_ms   single `CreateVMs` of one small VM through the gRPC API at the loaded size
  create_p99_ms   (goal p99 < 50 at 10,000 hosts / 100,000 VMs)
  takeover_s      a standby (warm cache) leads this long after the leader is killed (-9);
                  bounded below by the session TTL (the lease must expire first)

    python bench/scale.py --json [--hosts 10000] [--vms 100000] [--creates 40] [--no-takeover]
    SCALE_PROFILE=/tmp/leader.txt python bench/scale.py ...   # the leader's profile, creates incl.
    SCALE_PROFILE_START=/tmp/start.txt python bench/scale.py ...   # the leader's cold start
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from hvplace.coordinator.store import Store
from hvplace.proto import codec, keyspace
from hvplace.proto.records import VM, Assignment, HostInfo, Phase, Resources, VMStatus

OPS_PER_TXN = 1000
SESSION_TTL_S = 5.0


def _rss_mb(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def load(endpoint: str, n_hosts: int, n_vms: int) -> None:
    store = await Store.connect([endpoint], timeout=60)
    lease = await store.grant(3600)
    zones = ("east", "west", "north")
    hosts = [
        HostInfo(
            name=f"hv{i:05d}",
            labels={"zone": zones[i % 3], "rack": f"r{i // 40:03d}"},
            capacity=Resources(vcpus=64, memory_mib=262144, disk_gib=4000),
        )
        for i in range(n_hosts)
    ]
    for i in range(0, n_hosts, OPS_PER_TXN):
        puts = {keyspace.host(h.name): codec.dumps(h) for h in hosts[i : i + OPS_PER_TXN]}
        await store.commit([], puts, fence=None, lease=lease)
    per_txn = OPS_PER_TXN // 3
    for i in range(0, n_vms, per_txn):
        puts = {}
        for j in range(i, min(n_vms, i + per_txn)):
            scope = f"tenant{j % 500:03d}"
            vm = VM(
                scope=scope,
                name=f"vm{j:06d}",
                uid=f"u{j:06d}",
                labels={"app": f"app{j % 50}", "tier": ("web", "db", "cache")[j % 3]},
                resources=Resources(vcpus=2, memory_mib=4096, disk_gib=20),
                created_at=1.7e9,
            )
            host = hosts[j % n_hosts].name
            puts[keyspace.vm(scope, vm.name)] = codec.dumps(vm)
            puts[keyspace.assignment(host, scope, vm.name)] = codec.dumps(
                Assignment(vm=vm, host=host, epoch=1)
            )
            status = VMStatus(scope=scope, name=vm.name, phase=Phase.SCHEDULED, host=host, epoch=1)
            puts[keyspace.vm_status(scope, vm.name)] = codec.dumps(status)
        await store.commit([], puts, fence=None)
    await store.close()


async def child(endpoint: str, name: str) -> None:
    """A whole coordinator with its gRPC API: prints `ready` (cache listed, with the time it
    took), then `leader` when it takes office."""
    from hvplace.coordinator.config import CoordinatorConfig
    from hvplace.coordinator.daemon import Coordinator, tune_collector

    tune_collector()  # as hvplace-coordinator's main does

    cfg = CoordinatorConfig(
        node_name=name,
        etcd_endpoints=(endpoint,),
        listen="127.0.0.1:0",
        metrics_listen="",
        session_ttl_s=SESSION_TTL_S,
        anonymous_role="operator",  # plain gRPC on loopback, as bench/commit.py without --secure
    )
    start_profile = os.environ.get("SCALE_PROFILE_START", "")
    profiler = _start_profiler() if start_profile and name == "c1" else None
    started = time.perf_counter()
    cpu_started = time.process_time()
    async with Coordinator(cfg) as c:
        rebuild = time.perf_counter() - started
        rebuild_cpu = time.process_time() - cpu_started
        if profiler is not None:
            profiler.stop()
            _write(start_profile, profiler.output_text(unicode=False, color=False))
        assert c.cache is not None and c.election is not None
        print(
            json.dumps(
                {
                    "event": "ready",
                    "rebuild_s": rebuild,
                    "rebuild_cpu_s": rebuild_cpu,
                    "port": c.api_port,
                    "at": time.time(),
                }
            ),
            flush=True,
        )
        was = False
        profile_to = os.environ.get("SCALE_PROFILE", "")
        while True:
            lead = c.election.is_leader
            if lead and not was:
                print(json.dumps({"event": "leader", "at": time.time()}), flush=True)
                if profile_to:
                    _profile_until_usr1(profile_to)
            was = lead
            await asyncio.sleep(0.005)


def _write(path: str, text: str) -> None:
    Path(path).write_text(text)


def _start_profiler() -> Any:
    """SCALE_PROFILE_START=FILE: a pyinstrument profile of the leader's cold start (from
    the Coordinator's construction to ready), written to FILE."""
    from pyinstrument import Profiler

    profiler = Profiler(async_mode="enabled")
    profiler.start()
    return profiler


def _profile_until_usr1(path: str) -> None:
    """SCALE_PROFILE=FILE: a pyinstrument profile of the leader from taking office to the
    end of the creates (the parent sends SIGUSR1), written to FILE."""
    from pyinstrument import Profiler

    profiler = Profiler(async_mode="disabled")
    profiler.start()

    def dump() -> None:
        profiler.stop()
        Path(path).write_text(profiler.output_text(unicode=False, color=False))

    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, dump)


def spawn(endpoint: str, name: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, "--child", endpoint, "--name", name],
        stdout=subprocess.PIPE,
        stderr=open(os.environ.get("SCALE_LOG", os.devnull), "a"),
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )


def wait_event(proc: subprocess.Popen[str], event: str) -> dict[str, float]:
    assert proc.stdout is not None
    while True:
        line = proc.stdout.readline()
        if not line:
            raise SystemExit(f"coordinator exited (code {proc.wait()}) before {event!r}")
        msg = json.loads(line)
        if msg["event"] == event:
            return msg  # type: ignore[no-any-return]


def creates(port: int, count: int) -> list[float]:
    """`count` single CreateVMs of one small VM, each timed at the client (seconds)."""
    import grpc
    from hvplace.proto.v1 import hvplace_pb2 as pb
    from hvplace.proto.v1 import hvplace_pb2_grpc as pb_grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = pb_grpc.VMServiceStub(channel)
    grpc.channel_ready_future(channel).result(timeout=60)
    took = []
    for i in range(count):
        request = pb.CreateVMsRequest(
            request_id=f"bench-{i}",
            vms=[
                pb.VM(
                    scope="bench",
                    name=f"single{i:04d}",
                    resources=pb.Resources(vcpus=1, memory_mib=512, disk_gib=1),
                    image=pb.Image(kernel="/boot/vmlinuz"),
                )
            ],
        )
        t = time.perf_counter()
        stub.CreateVMs(request, timeout=60)
        took.append(time.perf_counter() - t)
    channel.close()
    return took


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hosts", type=int, default=10_000)
    p.add_argument("--vms", type=int, default=100_000)
    p.add_argument("--creates", type=int, default=40)
    p.add_argument("--no-takeover", action="store_true")
    p.add_argument("--json", action="store_true", help="print only the JSON line")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--name", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        asyncio.run(child(args.child, args.name))
        return 0
    from support.etcd import EtcdServer

    etcd = EtcdServer()
    etcd.start()
    procs: list[subprocess.Popen[str]] = []
    try:
        t0 = time.perf_counter()
        asyncio.run(load(etcd.endpoint, args.hosts, args.vms))
        load_s = time.perf_counter() - t0
        if not args.json:
            print(f"loaded {args.hosts} hosts, {args.vms} VMs in {load_s:.1f}s", file=sys.stderr)
        leader = spawn(etcd.endpoint, "c1")
        procs.append(leader)
        ready = wait_event(leader, "ready")
        wait_event(leader, "leader")
        time.sleep(2.0)  # the controller's first pass (nothing to place)
        took = creates(int(ready["port"]), args.creates)
        if os.environ.get("SCALE_PROFILE"):
            report = Path(os.environ["SCALE_PROFILE"])
            report.unlink(missing_ok=True)
            leader.send_signal(signal.SIGUSR1)
            while not report.exists() and leader.poll() is None:
                time.sleep(0.1)
        result: dict[str, object] = {
            "hosts": args.hosts,
            "vms": args.vms,
            "rebuild_s": round(ready["rebuild_s"], 2),
            "rebuild_cpu_s": round(ready["rebuild_cpu_s"], 2),
            "rss_mb": round(_rss_mb(leader.pid), 1),
            "creates": len(took),
            "create_p50_ms": round(percentile(took, 0.50) * 1000, 1),
            "create_p99_ms": round(percentile(took, 0.99) * 1000, 1),
            "load_s": round(load_s, 1),
        }
        if not args.no_takeover:
            standby = spawn(etcd.endpoint, "c2")
            procs.append(standby)
            wait_event(standby, "ready")
            time.sleep(2.0)  # the standby follows the watch
            killed_at = time.time()
            leader.send_signal(signal.SIGKILL)
            leader.wait()
            took_office = wait_event(standby, "leader")["at"]
            result["session_ttl_s"] = SESSION_TTL_S
            result["takeover_s"] = round(took_office - killed_at, 2)
        print(json.dumps(result))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        etcd.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
