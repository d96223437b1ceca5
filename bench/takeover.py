"""Leader takeover at scale: N hosts and M VMs loaded (as bench/scale.py does), a leader and a
standby coordinator (child processes, warm caches), kill -9 the leader, and report one
JSON line, timed from the kill:

  takeover_s         until the standby leads (its election holds the fence; API writes
                     are accepted from then on)
  first_placement_s  until a VM written at the kill is assigned by the new leader

Goal: both within the leader's session TTL + 0.5 s (the session lease must expire first).

    python bench/takeover.py --json [--hosts 10000] [--vms 100000] [--session-ttl 5]

TAKEOVER_LOG=FILE appends both coordinators' logs (and the kill's time) to FILE.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from hvplace.coordinator.store import Store
from hvplace.proto import codec, keyspace
from hvplace.proto.records import VM, Resources
from scale import load


async def child(endpoint: str, name: str, ttl: float) -> None:
    """A whole coordinator (no API port): prints `ready` once its cache is listed and
    watching, and `leader` with the time it took office."""
    from hvplace.coordinator.config import CoordinatorConfig
    from hvplace.coordinator.daemon import Coordinator

    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {name} %(name)s %(message)s")
    cfg = CoordinatorConfig(
        node_name=name,
        etcd_endpoints=(endpoint,),
        listen="",
        metrics_listen="",
        session_ttl_s=ttl,
    )
    async with Coordinator(cfg) as c:
        assert c.election is not None
        print(json.dumps({"event": "ready", "at": time.time()}), flush=True)
        was = False
        while True:
            lead = c.election.is_leader
            if lead and not was:
                print(json.dumps({"event": "leader", "at": time.time()}), flush=True)
            was = lead
            await asyncio.sleep(0.005)


def spawn(endpoint: str, name: str, ttl: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, "--child", endpoint, "--name", name, "--session-ttl", str(ttl)],
        stdout=subprocess.PIPE,
        stderr=open(os.environ.get("TAKEOVER_LOG", os.devnull), "a"),
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )


def wait_event(proc: subprocess.Popen[str], event: str) -> float:
    assert proc.stdout is not None
    while True:
        line = proc.stdout.readline()
        if not line:
            raise SystemExit(f"coordinator exited (code {proc.wait()}) before {event!r}")
        msg = json.loads(line)
        if msg["event"] == event:
            return float(msg["at"])


async def probe(endpoint: str, killed_at: float, limit_s: float) -> float:
    """Write a new VM at once and wait for its assignment; seconds since the kill."""
    store = await Store.connect([endpoint], timeout=30)
    try:
        vm = VM(scope="probe", name="after-kill", resources=Resources(1, 512, 0))
        await store.put(keyspace.vm(vm.scope, vm.name), codec.dumps(vm))
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            kv = await store.get(keyspace.vm_status(vm.scope, vm.name))
            if kv is not None and b'"scheduled"' in kv.value:
                return time.time() - killed_at
            await asyncio.sleep(0.01)
        raise SystemExit(f"the probe VM was not placed within {limit_s}s")
    finally:
        await store.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hosts", type=int, default=10_000)
    p.add_argument("--vms", type=int, default=100_000)
    p.add_argument("--session-ttl", type=float, default=5.0)
    p.add_argument("--json", action="store_true", help="print only the JSON line")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--name", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        asyncio.run(child(args.child, args.name, args.session_ttl))
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
        leader = spawn(etcd.endpoint, "c1", args.session_ttl)
        procs.append(leader)
        wait_event(leader, "leader")
        standby = spawn(etcd.endpoint, "c2", args.session_ttl)
        procs.append(standby)
        started = time.time()
        ready = wait_event(standby, "ready")
        time.sleep(3.0)  # the leader's first passes; the standby follows the watch
        killed_at = time.time()
        logging.basicConfig(level=logging.INFO)
        logging.getLogger("takeover").info("kill at %.3f", killed_at)
        leader.send_signal(signal.SIGKILL)
        leader.wait()
        placed_s = asyncio.run(probe(etcd.endpoint, killed_at, 60))
        took_office = wait_event(standby, "leader")
        result = {
            "hosts": args.hosts,
            "vms": args.vms,
            "session_ttl_s": args.session_ttl,
            "standby_ready_s": round(ready - started, 2),
            "takeover_s": round(took_office - killed_at, 2),
            "first_placement_s": round(placed_s, 2),
            "goal_s": args.session_ttl + 0.5,
            "within_goal": placed_s <= args.session_ttl + 0.5,
            "load_s": round(load_s, 1),
        }
        print(json.dumps(result))
        return 0 if result["within_goal"] else 1
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        etcd.close()


if __name__ == "__main__":
    sys.exit(main())
