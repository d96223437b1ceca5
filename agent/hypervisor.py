"""The one seam to libvirt: a typed Protocol and its libvirt-python adapter (the only libvirt importer).

Blocking libvirt calls run on a small thread pool, never on the event loop; lifecycle
events come from libvirt's default event loop, run in its own daemon thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import os
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import libvirt
from hvplace.agent import domain_xml
from hvplace.agent.capacity import NodeFacts
from hvplace.agent.images import ImageFiles
from hvplace.agent.reconcile import Observed
from hvplace.proto.errors import InvalidInput, Unavailable
from hvplace.proto.records import Assignment, DomainState

log = logging.getLogger(__name__)
T = TypeVar("T")

PROBE_DOMAIN = "hvplace-kvm-probe"
MIGRATION_THREADS = 4
"""Outgoing live migrations at once per host (the coordinator bounds a drain lower)."""
EventCallback = Callable[[str], None]


class HypervisorError(Unavailable):
    """A libvirt or qemu-img call failed for one domain; the message is libvirt's."""


class HypervisorUnavailable(HypervisorError):
    """The connection to libvirt is unusable (libvirtd down or not answering): a fault of
    the host, never of the VM the call was for."""


class Hypervisor(Protocol):
    uri: str
    domain_type: str

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def node_facts(self) -> NodeFacts: ...
    async def list_managed(self) -> dict[str, Observed]: ...
    async def define(self, assignment: Assignment) -> str: ...
    async def start(self, domain: str) -> None: ...
    async def stop(self, domain: str, timeout_s: float) -> None: ...
    async def destroy(self, domain: str) -> None: ...
    async def undefine(self, domain: str) -> None: ...
    async def destroy_all_managed(self) -> list[str]: ...
    async def ping(self, timeout_s: float) -> None: ...
    def on_event(self, callback: EventCallback) -> None: ...
    async def migrate(self, domain: str, target: MigrationTarget) -> None: ...
    async def retag(self, domain: str, assignment: Assignment) -> None: ...


@dataclasses.dataclass(frozen=True, slots=True)
class MigrationTarget:
    """Where a live migration goes: the target libvirtd's URI (dialled by this host's
    libvirtd, peer to peer), the address its QEMU listens on for the data stream, the
    console log path there, and how long the job may take before it is aborted."""

    uri: str
    address: str
    console_log: str
    timeout_s: float


# libvirt's default event loop is process-wide and must be registered before the first
# connection is opened; one daemon thread runs it for every connection of the process.
_event_loop_lock = threading.Lock()
_event_loop_started = False


def _ensure_event_loop() -> None:
    global _event_loop_started
    with _event_loop_lock:
        if _event_loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _event_loop_started = True


def _quiet_error_handler(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr by default; we raise them instead."""


_STATE = {
    libvirt.VIR_DOMAIN_RUNNING: DomainState.RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: DomainState.RUNNING,
    libvirt.VIR_DOMAIN_SHUTDOWN: DomainState.RUNNING,  # shutting down: still running
    libvirt.VIR_DOMAIN_PAUSED: DomainState.PAUSED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: DomainState.PAUSED,
    libvirt.VIR_DOMAIN_CRASHED: DomainState.CRASHED,
}


def _state(state: int, reason: int) -> DomainState:
    if state == libvirt.VIR_DOMAIN_SHUTOFF:
        if reason in (libvirt.VIR_DOMAIN_SHUTOFF_CRASHED, libvirt.VIR_DOMAIN_SHUTOFF_FAILED):
            return DomainState.CRASHED
        if reason == libvirt.VIR_DOMAIN_SHUTOFF_UNKNOWN:
            return DomainState.DEFINED
        return DomainState.STOPPED
    return _STATE.get(state, DomainState.STOPPED)


def _no_domain(e: libvirt.libvirtError) -> bool:
    return bool(e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN)


def _not_running(e: libvirt.libvirtError) -> bool:
    return bool(e.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID)


class LibvirtHypervisor:
    """libvirt on `uri`; `domain_type` is kvm, qemu or auto (probed once, cached on disk)."""

    def __init__(
        self,
        uri: str,
        *,
        domain_type: str = "auto",
        images_dir: Path,
        console_dir: Path,
        state_dir: Path,
        guest_cache_dir: Path = Path("/var/cache/hvplace/guest"),
        probe_timeout_s: float = 15.0,
        image_dirs: Sequence[Path] = (),
    ) -> None:
        self.uri = uri
        self._wanted_type = domain_type
        self.domain_type = "test" if uri.startswith("test:") else domain_type
        self._images = images_dir
        self._consoles = console_dir
        self._state_dir = state_dir
        self._guest_cache = guest_cache_dir
        self._probe_timeout = probe_timeout_s
        self.image_files = ImageFiles(image_dirs)
        self._conn: Any = None
        self._conn_lock = threading.Lock()
        self._callbacks: list[EventCallback] = []
        self._callback_ids: list[int] = []
        # Enough threads that a slow graceful stop never holds up a fence's destroys.
        self._pool = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="libvirt")
        self._ping_pool = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="libvirt-ping"
        )
        self._ping: asyncio.Future[None] | None = None
        # Live migrations run for seconds: on their own threads, so that the pool stays
        # free for starts and a fence's destroys while they run.
        self._migrations = concurrent.futures.ThreadPoolExecutor(
            MIGRATION_THREADS, thread_name_prefix="libvirt-migrate"
        )

    # -- plumbing ---------------------------------------------------------------------

    async def _call(self, fn: Callable[..., T], *args: Any, what: str = "") -> T:
        """Run a blocking call on the pool; whatever it raises comes back typed: a
        HypervisorUnavailable when the connection is gone, else a HypervisorError with
        the message (libvirt-python also raises ValueError, TypeError... on bad input:
        one VM's spec must never take the agent down)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._guarded, fn, what, args)

    def _guarded(self, fn: Callable[..., T], what: str, args: tuple[Any, ...]) -> T:
        try:
            return fn(*args)
        except HypervisorUnavailable:
            raise
        except HypervisorError as e:
            if not self._alive():  # the connection died under the call: not the VM's fault
                raise HypervisorUnavailable(
                    f"libvirt at {self.uri} unreachable: {e.message}"
                ) from None
            raise
        except InvalidInput:
            raise
        except libvirt.libvirtError as e:
            message = f"{what}: {e}" if what else str(e)
            if not self._alive():
                raise HypervisorUnavailable(
                    f"libvirt at {self.uri} unreachable: {message}"
                ) from None
            raise HypervisorError(message) from None
        except Exception as e:
            name = what or getattr(fn, "__name__", "libvirt call").lstrip("_")
            raise HypervisorError(f"{name}: {type(e).__name__}: {e}") from None

    def _alive(self) -> bool:
        """Whether the connection still works (after a call failed: theirs or ours?)."""
        conn = self._conn
        if conn is None:
            return False
        try:
            return bool(conn.isAlive())
        except libvirt.libvirtError:
            return False

    def _connection(self) -> Any:
        """The open connection, reopened if libvirtd went away. test:/// state lives in
        the connection, so it is only ever opened once."""
        with self._conn_lock:
            conn = self._conn
            if conn is not None:
                try:
                    if conn.isAlive():
                        return conn
                except libvirt.libvirtError:
                    pass
                log.warning("libvirt connection to %s lost; reconnecting", self.uri)
                with contextlib.suppress(libvirt.libvirtError):
                    conn.close()
                self._conn = None
            try:
                conn = libvirt.open(self.uri)
            except libvirt.libvirtError as e:
                raise HypervisorUnavailable(
                    f"cannot connect to libvirt at {self.uri}: {e}"
                ) from None
            if not self.uri.startswith("test:"):
                # Keepalive makes a dead libvirtd visible within seconds (needs the event loop).
                with contextlib.suppress(libvirt.libvirtError):
                    conn.setKeepAlive(5, 3)
            self._callback_ids = [
                conn.domainEventRegisterAny(
                    None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._lifecycle, None
                )
            ]
            self._conn = conn
            return conn

    def _lifecycle(self, _conn: Any, dom: Any, event: int, detail: int, _opaque: Any) -> None:
        name = dom.name()
        log.debug("libvirt event %s/%s on %s", event, detail, name)
        for cb in list(self._callbacks):
            try:
                cb(name)
            except Exception:
                log.exception("domain event callback failed")

    def on_event(self, callback: EventCallback) -> None:
        """`callback(domain_name)` runs on libvirt's event thread: hand it to the loop."""
        self._callbacks.append(callback)

    def _lookup(self, name: str) -> Any:
        return self._connection().lookupByName(name)

    # -- lifecycle --------------------------------------------------------------------

    async def open(self) -> None:
        _ensure_event_loop()
        libvirt.registerErrorHandler(_quiet_error_handler, None)
        await self._call(self._connection, what="connecting")
        for d in (self._images, self._consoles, self._state_dir):
            d.mkdir(parents=True, exist_ok=True)
        if self.domain_type == "auto":
            self.domain_type = await self._call(self._resolve_auto, what="probing kvm")

    async def close(self) -> None:
        def close() -> None:
            with self._conn_lock:
                conn, self._conn = self._conn, None
            if conn is not None:
                for cid in self._callback_ids:
                    with contextlib.suppress(libvirt.libvirtError):
                        conn.domainEventDeregisterAny(cid)
                with contextlib.suppress(libvirt.libvirtError):
                    conn.close()

        with contextlib.suppress(HypervisorError):
            await self._call(close, what="closing")
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._ping_pool.shutdown(wait=False, cancel_futures=True)
        self._migrations.shutdown(wait=False, cancel_futures=True)

    # -- facts ------------------------------------------------------------------------

    async def node_facts(self) -> NodeFacts:
        def facts() -> NodeFacts:
            conn = self._connection()
            info = conn.getInfo()  # [model, memory MiB, cpus, mhz, nodes, sockets, cores, threads]
            return NodeFacts(
                cpus=int(info[2]), memory_mib=int(info[1]), hostname=conn.getHostname()
            )

        return await self._call(facts, what="reading node facts")

    async def ping(self, timeout_s: float) -> None:
        """One cheap round trip to libvirtd (reconnecting if needed), on its own thread so
        that a hung libvirtd cannot starve the pool; raises HypervisorUnavailable."""
        pending = self._ping
        if pending is not None and not pending.done():
            # The previous ping still waits: libvirtd does not answer.
            raise HypervisorUnavailable(f"libvirt at {self.uri} is not answering")

        def ping() -> None:
            try:
                self._connection().getLibVersion()
            except libvirt.libvirtError as e:
                raise HypervisorUnavailable(f"libvirt at {self.uri} unreachable: {e}") from None

        loop = asyncio.get_running_loop()
        self._ping = loop.run_in_executor(self._ping_pool, ping)
        # A ping that outlives its timeout is awaited by nobody: retrieve its outcome.
        self._ping.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            await asyncio.wait_for(asyncio.shield(self._ping), timeout_s)
        except TimeoutError:
            raise HypervisorUnavailable(
                f"libvirt at {self.uri} did not answer within {timeout_s:.1f}s"
            ) from None

    def _observe(self, dom: Any) -> Observed | None:
        try:
            meta = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, domain_xml.NAMESPACE)
        except libvirt.libvirtError:
            return None  # no hvplace element: not ours, never touched
        tag = domain_xml.parse_tag(meta)
        if tag is None:
            return None
        state, reason = dom.state()
        return Observed(
            scope=tag.scope,
            name=tag.name,
            domain=dom.name(),
            uid=tag.uid,
            epoch=tag.epoch,
            state=_state(state, reason),
        )

    def _list_managed(self) -> dict[str, Observed]:
        out: dict[str, Observed] = {}
        for dom in self._connection().listAllDomains():
            try:
                obs = self._observe(dom)
            except libvirt.libvirtError as e:
                if _no_domain(e):
                    continue  # vanished between list and look
                raise
            if obs is None:
                continue
            if obs.key in out:
                log.error(
                    "two domains claim VM %s: %s and %s", obs.key, out[obs.key].domain, obs.domain
                )
            out[obs.key] = obs
        return out

    async def list_managed(self) -> dict[str, Observed]:
        return await self._call(self._list_managed, what="listing domains")

    async def domain_id(self, domain: str) -> int:
        """The running domain's ID (-1 when off): a restart of the agent must not change it."""
        return int(await self._call(lambda: self._lookup(domain).ID(), what=f"ID of {domain}"))

    async def qemu_pid(self, domain: str) -> int | None:
        """The QEMU process of a running domain, from libvirt's pid file (qemu:/// only)."""
        for run in (Path("/run/libvirt/qemu"), Path("/var/run/libvirt/qemu")):
            pid_file = run / f"{domain}.pid"
            if pid_file.exists():
                return int(pid_file.read_text().strip())
        return None

    # -- actions ----------------------------------------------------------------------

    def console_log(self, domain: str) -> Path:
        return self._consoles / f"{domain}.log"

    def overlay_path(self, domain: str) -> Path:
        return self._images / f"{domain}.qcow2"

    def _create_overlay(self, base: str, overlay: Path, disk_gib: int) -> None:
        info = subprocess.run(
            ["qemu-img", "info", "--output=json", base], capture_output=True, text=True
        )
        if info.returncode != 0:
            raise InvalidInput(f"base image {base}: {info.stderr.strip()}")
        fmt = json.loads(info.stdout).get("format", "raw")
        tmp = overlay.with_suffix(".tmp")
        argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", fmt, "-b", base, str(tmp)]
        if disk_gib:
            argv.append(f"{disk_gib}G")
        made = subprocess.run(argv, capture_output=True, text=True)
        if made.returncode != 0:
            raise HypervisorError(f"qemu-img create {overlay}: {made.stderr.strip()}")
        os.replace(tmp, overlay)

    def _define(self, assignment: Assignment) -> str:
        # A catalogue image's files, found in the image dirs and checked against their
        # digests (on this worker thread: hashing a base disk can take seconds).
        vm = self.image_files.resolve(assignment.vm)
        assignment = dataclasses.replace(assignment, vm=vm)
        name = domain_xml.domain_name(vm.scope, vm.name)
        for what, path in (
            ("kernel", vm.image.kernel),
            ("initrd", vm.image.initrd),
            ("disk", vm.image.disk),
        ):
            if path and not Path(path).is_file() and not self.uri.startswith("test:"):
                raise InvalidInput(f"VM {vm.key}: {what} {path} does not exist on this host")
        disk = ""
        if vm.image.disk and not vm.image.kernel:
            overlay = self.overlay_path(name)
            if not self.uri.startswith("test:") and not overlay.exists():
                self._create_overlay(vm.image.disk, overlay, vm.resources.disk_gib)
            disk = str(overlay)
        xml = domain_xml.render(
            assignment,
            domain_type=self.domain_type,
            serial_log=str(self.console_log(name)),
            disk_path=disk,
        )
        try:
            self._connection().defineXML(xml)
        except libvirt.libvirtError as e:
            raise HypervisorError(f"defining {name}: {e}") from None
        return name

    async def define(self, assignment: Assignment) -> str:
        name = domain_xml.domain_name(assignment.vm.scope, assignment.vm.name)
        return await self._call(self._define, assignment, what=f"defining {name}")

    def _start(self, domain: str) -> None:
        try:
            dom = self._lookup(domain)
            if not dom.isActive():
                # A fresh log per boot, so the marker read is this boot's.
                with contextlib.suppress(OSError):
                    self.console_log(domain).unlink()
                dom.create()
        except libvirt.libvirtError as e:
            raise HypervisorError(f"starting {domain}: {e}") from None

    async def start(self, domain: str) -> None:
        await self._call(self._start, domain, what=f"starting {domain}")

    def _destroy(self, domain: str) -> None:
        try:
            self._lookup(domain).destroy()
        except libvirt.libvirtError as e:
            if not (_no_domain(e) or _not_running(e)):
                raise HypervisorError(f"destroying {domain}: {e}") from None

    async def destroy(self, domain: str) -> None:
        await self._call(self._destroy, domain, what=f"destroying {domain}")

    def _stop(self, domain: str, timeout_s: float) -> None:
        """ACPI shutdown, then destroy when the guest ignores it for `timeout_s`."""
        try:
            dom = self._lookup(domain)
            dom.shutdown()
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                if not dom.isActive():
                    return
                time.sleep(0.2)
        except libvirt.libvirtError as e:
            if _no_domain(e) or _not_running(e):
                return
            raise HypervisorError(f"stopping {domain}: {e}") from None
        log.info("%s ignored shutdown for %.0fs; destroying it", domain, timeout_s)
        self._destroy(domain)

    async def stop(self, domain: str, timeout_s: float) -> None:
        await self._call(self._stop, domain, timeout_s, what=f"stopping {domain}")

    def _undefine(self, domain: str) -> None:
        try:
            dom = self._lookup(domain)
            if dom.isActive():
                dom.destroy()
            dom.undefine()
        except libvirt.libvirtError as e:
            if not _no_domain(e):
                raise HypervisorError(f"undefining {domain}: {e}") from None
        with contextlib.suppress(OSError):
            self.overlay_path(domain).unlink()

    async def undefine(self, domain: str) -> None:
        await self._call(self._undefine, domain, what=f"undefining {domain}")

    def _destroy_all_managed(self) -> list[str]:
        destroyed = []
        for obs in self._list_managed().values():
            if obs.state in (DomainState.RUNNING, DomainState.PAUSED):
                try:
                    self._destroy(obs.domain)
                    destroyed.append(obs.domain)
                except HypervisorError:
                    log.exception("fence: could not destroy %s", obs.domain)
        return destroyed

    async def destroy_all_managed(self) -> list[str]:
        return await self._call(self._destroy_all_managed, what="fence")

    # -- live migration ---------------------------------------------------------------

    def _migrate(self, domain: str, target: MigrationTarget) -> None:
        """migrateToURI3, live and peer to peer: this host's libvirtd dials the target's
        and drives the job; the guest's memory goes over tcp://<target address>. On
        success the target holds the domain (persistent) and this host's copy is gone;
        on failure or abort the guest runs on here. Aborted after `timeout_s`."""
        dom = self._lookup(domain)
        xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE)
        params = {
            libvirt.VIR_MIGRATE_PARAM_URI: f"tcp://{target.address}",
            libvirt.VIR_MIGRATE_PARAM_DEST_XML: domain_xml.with_console_log(
                xml, target.console_log
            ),
        }
        flags = (
            libvirt.VIR_MIGRATE_LIVE
            | libvirt.VIR_MIGRATE_PEER2PEER
            | libvirt.VIR_MIGRATE_PERSIST_DEST
            | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
            | libvirt.VIR_MIGRATE_ABORT_ON_ERROR
        )
        timer = threading.Timer(target.timeout_s, self._abort_job, (dom, domain))
        timer.daemon = True
        timer.start()
        try:
            dom.migrateToURI3(target.uri, params, flags)
        except libvirt.libvirtError as e:
            raise HypervisorError(f"migrating {domain} to {target.uri}: {e}") from None
        finally:
            timer.cancel()

    @staticmethod
    def _abort_job(dom: Any, domain: str) -> None:
        log.warning("migration of %s overran its timeout: aborting the job", domain)
        with contextlib.suppress(libvirt.libvirtError):
            dom.abortJob()

    async def migrate(self, domain: str, target: MigrationTarget) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(
            self._migrations, self._guarded, self._migrate, f"migrating {domain}", (domain, target)
        )

    def _retag(self, domain: str, assignment: Assignment) -> None:
        """Re-tag a migrated-in domain with its new assignment's epoch (live and config)."""
        vm = assignment.vm
        tag = domain_xml.DomainTag(vm.scope, vm.name, vm.uid, assignment.epoch)
        flags = libvirt.VIR_DOMAIN_AFFECT_LIVE | libvirt.VIR_DOMAIN_AFFECT_CONFIG
        dom = self._lookup(domain)
        if not dom.isPersistent():
            flags = libvirt.VIR_DOMAIN_AFFECT_LIVE
        dom.setMetadata(
            libvirt.VIR_DOMAIN_METADATA_ELEMENT,
            domain_xml.bare_tag_element(tag),
            domain_xml.PREFIX,
            domain_xml.NAMESPACE,
            flags,
        )

    async def retag(self, domain: str, assignment: Assignment) -> None:
        await self._call(self._retag, domain, assignment, what=f"re-tagging {domain}")

    # -- domain type probe ------------------------------------------------------------

    def _resolve_auto(self) -> str:
        """kvm only when a guest really boots under it (a /dev/kvm that hangs guests is
        common in nested setups); the answer is cached in the state dir."""
        cache = self._state_dir / "kvm-probe.json"
        with contextlib.suppress(OSError, ValueError, KeyError):
            cached = json.loads(cache.read_text())
            if cached["uri"] == self.uri:
                return str(cached["domain_type"])
        result = "kvm" if self._probe_kvm() else "qemu"
        cache.write_text(json.dumps({"uri": self.uri, "domain_type": result, "at": time.time()}))
        log.info("domain type auto: chose %s", result)
        return result

    def _probe_kvm(self) -> bool:
        from hvplace.agent import guest_image  # the probe boots the tiny guest

        if not Path("/dev/kvm").exists():
            return False
        image = guest_image.cached(self._guest_cache)
        if image is None:
            log.warning(
                "no guest image in %s for the kvm probe (build it with `hvplace-agent"
                " build-image`); using qemu",
                self._guest_cache,
            )
            return False
        conn = self._connection()
        with contextlib.suppress(libvirt.libvirtError):
            conn.lookupByName(PROBE_DOMAIN).destroy()
        serial = self._consoles / f"{PROBE_DOMAIN}.log"
        with contextlib.suppress(OSError):
            serial.unlink()
        xml = f"""<domain type='kvm'><name>{PROBE_DOMAIN}</name><memory unit='MiB'>64</memory>
<vcpu>1</vcpu><os><type arch='x86_64'>hvm</type><kernel>{image.kernel}</kernel>
<initrd>{image.initrd}</initrd><cmdline>{image.cmdline} hvplace.hostname=kvm-probe</cmdline></os>
<on_poweroff>destroy</on_poweroff><devices><serial type='file'><source path='{serial}'/>
<target port='0'/></serial><memballoon model='none'/></devices></domain>"""
        try:
            dom = conn.createXML(xml, 0)  # transient: gone once destroyed
        except libvirt.libvirtError as e:
            log.info("kvm probe could not start: %s", e)
            return False
        try:
            deadline = time.monotonic() + self._probe_timeout
            while time.monotonic() < deadline:
                with contextlib.suppress(OSError):
                    if guest_image.MARKER.encode() in serial.read_bytes():
                        return True
                time.sleep(0.2)
            return False
        finally:
            with contextlib.suppress(libvirt.libvirtError):
                dom.destroy()
