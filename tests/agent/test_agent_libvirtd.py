"""The agent daemon (`python -m hvplace.agent`) against a real libvirtd, real QEMU (TCG)
guests and a real etcd: boot, restart adoption, stale domains, bad specs, self-fencing."""

from __future__ import annotations

import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import libvirt
import pytest
from agent.conftest import domain_status, get_prefix, put_assignment
from hvplace.agent import guest_image
from hvplace.agent.domain_xml import NAMESPACE, domain_name, parse_tag
from hvplace.proto import keyspace
from hvplace.proto.codec import dumps
from hvplace.proto.records import VM, ClusterConfig, DomainState, Image, Resources
from support import libvirtd as libvirtd_support
from support import processes
from support.etcd import EtcdServer, free_port
from support.wait import eventually_blocking

pytestmark = pytest.mark.libvirtd


@pytest.fixture(scope="session")
def libvirtd() -> Iterator[libvirtd_support.Libvirtd]:
    try:
        daemon = libvirtd_support.start()
    except (RuntimeError, subprocess.CalledProcessError) as e:
        pytest.fail(str(e), pytrace=False)
    yield daemon
    daemon.stop_started()


@pytest.fixture(scope="session")
def guest() -> guest_image.GuestImage:
    try:
        return guest_image.build()
    except RuntimeError as e:
        pytest.fail(f"{e} (then: python -m hvplace.agent.guest_image)", pytrace=False)


@pytest.fixture
def scope(libvirtd: libvirtd_support.Libvirtd) -> Iterator[str]:
    """A scope of this test's own; every domain of it is destroyed and undefined after."""
    name = "t" + secrets.token_hex(4)
    yield name
    conn = libvirt.open(libvirtd.uri)
    try:
        for dom in conn.listAllDomains():
            try:
                tag = parse_tag(dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, NAMESPACE))
            except libvirt.libvirtError:
                continue
            if tag is not None and tag.scope == name:
                if dom.isActive():
                    dom.destroy()
                dom.undefine()
    finally:
        conn.close()


@pytest.fixture
def spawn_agent(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(host: str, etcd: EtcdServer, metrics_port: int = 0) -> subprocess.Popen[bytes]:
        conf = tmp_path / f"{host}.toml"
        conf.write_text(
            f'host = "{host}"\netcd_endpoints = ["{etcd.endpoint}"]\n'
            f'libvirt_uri = "{libvirtd_support.URI}"\nstate_dir = "{tmp_path / host}"\n'
            f'domain_type = "qemu"\nmetrics_listen = "127.0.0.1:{metrics_port}"\n'
            "resync_interval_s = 2.0\n"
        )
        log = open(tmp_path / f"{host}.log", "ab")  # noqa: SIM115 - the child's stdout
        proc = subprocess.Popen(
            [sys.executable, "-m", "hvplace.agent", "--config", str(conf)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        procs.append(proc)
        return proc

    yield spawn
    for proc in procs:
        stop_agent(proc)


def stop_agent(proc: subprocess.Popen[bytes]) -> None:
    processes.stop(proc)


def reconcile_passes(metrics_port: int) -> int:
    """Reconcile passes the agent serving metrics on this port has finished (0 before it
    answers)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("hvplace_agent_reconcile_seconds_count "):
            return int(float(line.split()[1]))
    return 0


def guest_vm(scope: str, name: str, image: guest_image.GuestImage) -> VM:
    return VM(
        scope=scope,
        name=name,
        uid=f"uid-{name}",
        resources=Resources(vcpus=1, memory_mib=96),
        image=Image(kernel=str(image.kernel), initrd=str(image.initrd), cmdline=image.cmdline),
    )


def lookup(uri: str, name: str) -> tuple[bool, int] | None:
    """(active, domain ID) of a domain, None when it is not defined."""
    conn = libvirt.open(uri)
    try:
        dom = conn.lookupByName(name)
        return bool(dom.isActive()), int(dom.ID())
    except libvirt.libvirtError:
        return None
    finally:
        conn.close()


def qemu_pid(domain: str) -> int:
    return int(Path(f"/run/libvirt/qemu/{domain}.pid").read_text().strip())


def serial_markers(tmp_path: Path, host: str, domain: str) -> int:
    log = tmp_path / host / "console" / f"{domain}.log"
    try:
        return log.read_bytes().count(guest_image.MARKER.encode())
    except OSError:
        return 0


def test_guest_boots_and_restarted_agent_adopts_it(
    libvirtd: libvirtd_support.Libvirtd,
    guest: guest_image.GuestImage,
    etcd: EtcdServer,
    scope: str,
    spawn_agent: Callable[..., subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    host = f"qh-{scope}"
    vm = guest_vm(scope, "web", guest)
    dom = domain_name(scope, "web")
    put_assignment(etcd, host, vm)
    # A bad spec: a kernel that does not exist on the host is refused before libvirt.
    bad = VM(scope=scope, name="bad", image=Image(kernel="/nonexistent/vmlinuz"))
    put_assignment(etcd, host, bad)
    t0 = time.monotonic()
    agent = spawn_agent(host, etcd)
    eventually_blocking(
        lambda: serial_markers(tmp_path, host, dom) == 1, 60, what="guest marker on serial log"
    )
    boot_s = time.monotonic() - t0
    log = (tmp_path / host / "console" / f"{dom}.log").read_text(errors="replace")
    assert f"{guest_image.MARKER} web" in log
    print(f"agent start to guest marker: {boot_s:.1f}s")
    status = eventually_blocking(
        lambda: (
            (s := domain_status(etcd, host, scope, "web")) and s.state is DomainState.RUNNING and s
        ),
        10,
        what="running status",
    )
    assert status.epoch == 1
    failed = eventually_blocking(
        lambda: domain_status(etcd, host, scope, "bad"), 10, what="bad status"
    )
    assert failed.state is DomainState.FAILED
    assert "/nonexistent/vmlinuz does not exist on this host" in failed.last_error
    assert lookup(libvirtd.uri, domain_name(scope, "bad")) is None

    before = lookup(libvirtd.uri, dom)
    pid = qemu_pid(dom)
    stop_agent(agent)
    assert lookup(libvirtd.uri, dom) == before  # stopping the agent leaves the VM alone
    port = free_port()
    agent = spawn_agent(host, etcd, metrics_port=port)
    eventually_blocking(
        lambda: keyspace.host(host) in get_prefix(etcd, keyspace.HOSTS), 15, what="re-register"
    )
    # Three whole reconcile passes of the new agent (it resyncs every 2 s): each had the
    # occasion to restart or redefine the domain, which it must not take.
    eventually_blocking(lambda: reconcile_passes(port) >= 3, 30, what="three reconcile passes")
    assert lookup(libvirtd.uri, dom) == before and qemu_pid(dom) == pid
    assert serial_markers(tmp_path, host, dom) == 1  # no second boot

    # A domain no longer assigned here is destroyed by an agent that comes back.
    stop_agent(agent)
    etcd.etcdctl("del", keyspace.assignment(host, scope, "web"))
    spawn_agent(host, etcd)
    eventually_blocking(lambda: lookup(libvirtd.uri, dom) is None, 15, what="stale domain removed")


def test_lost_lease_fences_within_budget_then_recovers(
    libvirtd: libvirtd_support.Libvirtd,
    guest: guest_image.GuestImage,
    own_etcd: EtcdServer,
    scope: str,
    spawn_agent: Callable[..., subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    budget = ClusterConfig(lease_ttl_s=4.0, fence_after_s=2.0)
    own_etcd.etcdctl("put", keyspace.CONFIG, dumps(budget).decode())
    host = f"fh-{scope}"
    dom = domain_name(scope, "db")
    put_assignment(own_etcd, host, guest_vm(scope, "db", guest))
    spawn_agent(host, own_etcd)
    eventually_blocking(lambda: serial_markers(tmp_path, host, dom) == 1, 60, what="guest marker")
    running = lookup(libvirtd.uri, dom)
    assert running is not None and running[0]

    own_etcd.signal(signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        eventually_blocking(
            lambda: not lookup(libvirtd.uri, dom)[0], budget.fence_after_s + 3, what="fence"
        )  # type: ignore[index]
        fenced_after = time.monotonic() - t0
    finally:
        own_etcd.signal(signal.SIGCONT)
    print(
        f"etcd frozen to domain destroyed: {fenced_after:.2f}s (fence_after {budget.fence_after_s}s)"
    )
    assert fenced_after <= budget.fence_after_s + 1.0
    # The agent logs the fence once its destroys returned: the line may trail libvirt.
    eventually_blocking(
        lambda: "FENCED host" in (tmp_path / f"{host}.log").read_text(), 2, what="fence logged"
    )

    # etcd is back: a new lease, the assignment re-read, the VM started again.
    t1 = time.monotonic()
    eventually_blocking(
        lambda: (r := lookup(libvirtd.uri, dom)) is not None and r[0],
        20,
        what="restart after fence",
    )
    eventually_blocking(
        lambda: serial_markers(tmp_path, host, dom) == 1, 60, what="guest marker after fence"
    )
    print(f"etcd resumed to guest running again: {time.monotonic() - t1:.2f}s")


async def test_auto_domain_type_boots_a_probe_guest_and_caches_the_answer(
    libvirtd: libvirtd_support.Libvirtd, guest: guest_image.GuestImage, tmp_path: Path
) -> None:
    """`auto` picks kvm only when the tiny guest really prints its marker under kvm; on
    machines whose /dev/kvm hangs guests (these) that means qemu."""
    from hvplace.agent.hypervisor import PROBE_DOMAIN, LibvirtHypervisor

    for d in ("images", "console"):
        (tmp_path / d).mkdir()

    def hypervisor() -> LibvirtHypervisor:
        return LibvirtHypervisor(
            libvirtd.uri,
            domain_type="auto",
            images_dir=tmp_path / "images",
            console_dir=tmp_path / "console",
            state_dir=tmp_path,
            guest_cache_dir=guest.kernel.parent,
            probe_timeout_s=8.0,
        )

    hv = hypervisor()
    await hv.open()
    await hv.close()
    serial = tmp_path / "console" / f"{PROBE_DOMAIN}.log"
    booted = serial.exists() and guest_image.MARKER.encode() in serial.read_bytes()
    assert hv.domain_type == ("kvm" if booted else "qemu")
    assert lookup(libvirtd.uri, PROBE_DOMAIN) is None, "the probe guest was left behind"
    cached = (tmp_path / "kvm-probe.json").read_text()
    assert hv.domain_type in cached
    # A second agent start reuses the cached answer instead of probing again.
    serial.unlink(missing_ok=True)
    again = hypervisor()
    await again.open()
    await again.close()
    assert again.domain_type == hv.domain_type
    assert not serial.exists()


def test_disk_image_vm_runs_on_a_qcow2_overlay_removed_with_it(
    libvirtd: libvirtd_support.Libvirtd,
    etcd: EtcdServer,
    scope: str,
    spawn_agent: Callable[..., subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    """A VM with a base disk image runs on its own qcow2 overlay backed by that image; the
    base is never written, and the overlay goes when the VM is unassigned."""
    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "64M"], check=True)
    base_bytes = base.read_bytes()
    host = f"dh-{scope}"
    vm = VM(
        scope=scope,
        name="disk",
        uid="uid-disk",
        resources=Resources(vcpus=1, memory_mib=64, disk_gib=1),
        image=Image(disk=str(base)),
    )
    put_assignment(etcd, host, vm)
    spawn_agent(host, etcd)
    dom = domain_name(scope, "disk")
    eventually_blocking(
        lambda: (s := lookup(libvirtd.uri, dom)) is not None and s[0], 30, what="domain running"
    )
    overlays = list((tmp_path / host / "images").glob("*.qcow2"))
    assert len(overlays) == 1
    info = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", str(overlays[0])],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert f'"backing-filename": "{base}"' in info
    assert '"virtual-size": 1073741824' in info
    conn = libvirt.open(libvirtd.uri)
    try:
        xml = conn.lookupByName(dom).XMLDesc(0)
    finally:
        conn.close()
    assert str(overlays[0]) in xml and str(base) not in xml.split("<backingStore")[0]
    etcd.etcdctl("del", keyspace.assignment(host, scope, "disk"))
    eventually_blocking(lambda: lookup(libvirtd.uri, dom) is None, 15, what="domain removed")
    eventually_blocking(lambda: not overlays[0].exists(), 5, what="overlay removed")
    assert base.read_bytes() == base_bytes
