"""The Vagrant lab (vagrant/, issue 13): `vagrant up` from the locally built box gives
etcd, two coordinators and three hypervisors provisioned by the production install; VMs
created under a rule survive the loss of a whole hypervisor VM (destroyed in libvirt, as
a power cut), with the rule kept and no VM running twice.

Not in the default run (marker `vagrant`; it takes tens of minutes under TCG): as root,
after `bash vagrant/build-box.sh`,

    flock /work/wt/.heavy.lock python -m pytest -m vagrant tests/vagrant

Vagrant and the lab's libvirtd run in a network and mount namespace of their own
(vagrant/netns.sh); this test reads etcd from a thread that joined that network
namespace, and runs the CLI and virsh inside it.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hvplace.agent.domain_xml import domain_name
from hvplace.agent.guest_image import CMDLINE
from hvplace.lab import observe
from hvplace.lab.observe import ClusterState, ObserveError

pytestmark = [pytest.mark.vagrant, pytest.mark.timeout(7200)]

REPO = Path(__file__).resolve().parents[2]
VAGRANT_DIR = REPO / "vagrant"
NETNS_SH = VAGRANT_DIR / "netns.sh"
CONTROL_IP = "192.168.213.10"
ETCD = f"http://{CONTROL_IP}:2379"
ENDPOINTS = f"{CONTROL_IP}:7420,{CONTROL_IP}:7421"
HYPERVISORS = ("hv1", "hv2", "hv3")
DOMAIN_PREFIX = "hvplace-lab-"
# A scope and image name of this run's own: VMs of an earlier run on a lab left up do not
# clash (`vagrant up` of a running lab only checks it).
RUN = uuid.uuid4().hex[:6]
SCOPE = f"lab-{RUN}"
IMAGE = f"tiny-{RUN}"
DB = ("db-1", "db-2")
WEB = ("web-1", "web-2")
VMS = tuple(f"{SCOPE}/{n}" for n in (*DB, *WEB))
GUEST_MEMORY_MIB = 64
# Generous: everything here runs under TCG (the guests under TCG inside TCG VMs) on a
# loaded 2-core machine.
UP_TIMEOUT_S = 5400.0
SETTLE_TIMEOUT_S = 1200.0
CLONE_NEWNET = 0x40000000


def in_lab(*argv: str, timeout: float, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`argv` in the lab's namespaces, with Vagrant pointed at vagrant/Vagrantfile."""
    env = dict(os.environ, VAGRANT_CWD=str(VAGRANT_DIR))
    out = subprocess.run(
        ["bash", str(NETNS_SH), "run", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    if check and out.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited {out.returncode}:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
        )
    return out


def ssh(node: str, command: str, timeout: float = 300.0) -> str:
    return in_lab("vagrant", "ssh", node, "-c", command, timeout=timeout).stdout


def _join_netns(pid: int) -> None:
    fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns into the lab's network namespace")
    finally:
        os.close(fd)


@dataclass
class VagrantLab:
    token_file: Path
    reader: ThreadPoolExecutor
    timings: dict[str, float] = field(default_factory=dict)
    samples: list[ClusterState] = field(default_factory=list)

    def read(self) -> ClusterState:
        return self.reader.submit(observe.read_cluster, ETCD).result()

    def hvplace(self, *args: str) -> str:
        # The installed console script: wherever the CLI's module lives.
        argv = [str(Path(sys.executable).parent / "hvplace"), "--endpoint", ENDPOINTS]
        argv += ["--token-file", str(self.token_file), "--timeout", "60", *args]
        return in_lab(*argv, timeout=600).stdout

    def watch(
        self, condition: Callable[[ClusterState], bool], timeout: float, what: str
    ) -> ClusterState:
        """Poll etcd until `condition`; every state read is kept and checked afterwards."""
        deadline = time.monotonic() + timeout
        last_error = ""
        while True:
            try:
                state = self.read()
            except ObserveError as exc:
                last_error = f" (last error: {exc})"
            else:
                self.samples.append(state)
                if condition(state):
                    return state
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout:.0f}s waiting for {what}{last_error}"
                )
            time.sleep(1.0)


@pytest.fixture(scope="module")
def vagrant_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VagrantLab]:
    if os.geteuid() != 0:
        pytest.fail(
            "the Vagrant lab needs root (libvirtd, netns): sudo python -m pytest -m vagrant",
            pytrace=False,
        )
    if shutil.which("vagrant") is None:
        pytest.fail(
            "vagrant is missing: apt-get install vagrant vagrant-libvirt libvirt-daemon-system",
            pytrace=False,
        )
    boxes = subprocess.run(["vagrant", "box", "list"], capture_output=True, text=True, timeout=120)
    if "hvplace/bookworm" not in boxes.stdout:
        pytest.fail(
            "no hvplace/bookworm box: build it with `bash vagrant/build-box.sh`", pytrace=False
        )
    subprocess.run(["bash", str(NETNS_SH), "start"], check=True, timeout=120)
    pid = int(
        subprocess.run(
            ["bash", str(NETNS_SH), "pid"], capture_output=True, text=True, check=True
        ).stdout
    )
    reader = ThreadPoolExecutor(1, initializer=_join_netns, initargs=(pid,))
    try:
        started = time.monotonic()
        in_lab("vagrant", "up", "--provider=libvirt", timeout=UP_TIMEOUT_S)
        up_s = time.monotonic() - started
        token_file = tmp_path_factory.mktemp("vagrant") / "admin.token"
        token_file.write_text(ssh("control", "sudo cat /etc/hvplace/admin.token").strip() + "\n")
        token_file.chmod(0o600)
        lab = VagrantLab(token_file, reader)
        lab.timings["vagrant_up_s"] = round(up_s, 1)
        yield lab
    finally:
        reader.shutdown()
        in_lab("vagrant", "destroy", "-f", timeout=1200, check=False)
        left = in_lab(
            "virsh", "-c", "qemu:///system", "list", "--all", "--name", timeout=120, check=False
        )
        subprocess.run(["bash", str(NETNS_SH), "stop"], check=False, timeout=300)
        assert not [d for d in left.stdout.split() if d.startswith(DOMAIN_PREFIX)], left.stdout


def running_once(s: ClusterState) -> list[str]:
    """VMs some agent reports running on more than one host (must stay empty)."""
    return [key for key in s.domains if len(s.running_on(key)) > 1]


def rule_broken(s: ClusterState) -> list[str]:
    where = {key: s.running_on(key) for key in s.vms}
    return observe.anti_affinity_violations(s.rules, where, s.host_labels(), s.vms)


def all_running(s: ClusterState, avoid: str | None = None) -> bool:
    for key in VMS:
        host = s.host_of(key)
        if host is None or host == avoid or s.running_on(key) != [host]:
            return False
    return True


def libvirt_domains(hosts: list[str]) -> dict[str, list[str]]:
    """Domain name -> the hypervisors whose libvirtd runs it, asked over `vagrant ssh`."""
    found: dict[str, list[str]] = {}
    for host in hosts:
        names = ssh(host, "sudo virsh -c qemu:///system list --name --state-running").split()
        for name in names:
            found.setdefault(name, []).append(host)
    return found


def test_vms_under_a_rule_fail_over_when_a_hypervisor_vm_dies(vagrant_lab: VagrantLab) -> None:
    lab = vagrant_lab
    registered = lab.watch(
        lambda s: set(HYPERVISORS) <= set(s.registered), SETTLE_TIMEOUT_S, "three agents registered"
    )
    assert {registered.registered[h].labels["rack"] for h in HYPERVISORS} == {"r1", "r2"}
    ssh(
        "control",
        "sudo hvplace --endpoint " + ENDPOINTS + " --token-file /etc/hvplace/admin.token"
        f" image add {IMAGE} --kernel tiny/vmlinuz --initrd tiny/initrd.img --cmdline '{CMDLINE}'"
        " --dir /var/lib/hvplace/images",
    )
    lab.hvplace("rule", "create", "db-apart", "--scope", SCOPE, "--kind", "anti-affinity",
                "--member", ",".join(DB))  # fmt: skip
    size = ["--vcpus", "1", "--memory", str(GUEST_MEMORY_MIB), "--image", IMAGE, "--ha", "high"]
    lab.hvplace("vm", "create", "--scope", SCOPE, *DB, *WEB, *size)
    started = time.monotonic()
    before = lab.watch(all_running, SETTLE_TIMEOUT_S, "the VMs running")
    lab.timings["guests_running_s"] = round(time.monotonic() - started, 1)
    hosts_db = {before.host_of(f"{SCOPE}/{n}") for n in DB}
    assert len(hosts_db) == 2, f"db-1 and db-2 share a host: {hosts_db}"

    # The victim holds a rule member, and the most VMs among those that do.
    victim = max(
        (h for h in hosts_db if h is not None),
        key=lambda h: sum(before.host_of(k) == h for k in VMS),
    )
    moving = [k for k in VMS if before.host_of(k) == victim]
    survivors = [h for h in HYPERVISORS if h != victim]
    killed_at = time.monotonic()
    in_lab("virsh", "-c", "qemu:///system", "destroy", DOMAIN_PREFIX + victim, timeout=120)
    after = lab.watch(
        lambda s: s.lost(victim) and all_running(s, avoid=victim),
        SETTLE_TIMEOUT_S,
        f"{', '.join(moving)} running again off {victim}",
    )
    lab.timings["failover_s"] = round(time.monotonic() - killed_at, 1)

    # In every state read, before and after the kill: no VM running twice, the rule kept.
    assert [s.at for s in lab.samples if running_once(s)] == []
    assert [v for s in lab.samples for v in rule_broken(s)] == []
    assert after.host_of(f"{SCOPE}/{DB[0]}") != after.host_of(f"{SCOPE}/{DB[1]}")
    # libvirt itself, on the surviving hypervisors: each VM's domain runs exactly once,
    # on the host it is assigned to.
    domains = libvirt_domains(survivors)
    for key in VMS:
        scope, name = key.split("/")
        assert domains.get(domain_name(scope, name)) == [after.host_of(key)], (key, domains)
    print("vagrant lab timings:", json.dumps(lab.timings))
