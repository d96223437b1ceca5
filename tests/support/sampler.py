"""Reads every lab host's libvirt every 100 ms, from outside hvplace, and keeps what it saw.

The ground truth for the end-to-end tests and the failover benchmark: which domains were
really running where, sample by sample, whatever etcd or the agents believe. A host
whose libvirtd is down (killed) counts as running nothing: its QEMUs were killed with it.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import libvirt
from hvplace.agent.domain_xml import domain_name
from hvplace.lab.observe import Endpoint, ObserveError, anti_affinity_violations, read_cluster
from hvplace.proto.records import VM, DomainState, Rule

libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors are raised, not printed


@dataclass(frozen=True)
class Sample:
    at: float  # time.time()
    running: Mapping[str, frozenset[str]]  # host -> VM keys ("scope/name") running there
    unreachable: frozenset[str]


class Sampler:
    """A thread that records where VMs run every `interval` seconds; subclasses look."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def take(self) -> Sample:
        raise NotImplementedError

    def close(self) -> None:
        """Release what `take` holds (after the thread has stopped)."""

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self.samples.append(self.take())
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - started)))

    # -- what the samples say -------------------------------------------------------

    def where(self, sample: Sample) -> dict[str, list[str]]:
        """VM key -> hosts it runs on in this sample."""
        out: dict[str, list[str]] = {}
        for host, keys in sample.running.items():
            for key in keys:
                out.setdefault(key, []).append(host)
        return out

    def duplicates(self) -> list[str]:
        """Every sample in which a VM ran on two hosts at once."""
        return [
            f"t={s.at:.2f} {key} on {sorted(hosts)}"
            for s in self.samples
            for key, hosts in self.where(s).items()
            if len(hosts) > 1
        ]

    def violations(
        self,
        rules: Iterable[Rule],
        vms: Mapping[str, VM],
        host_labels: Mapping[str, Mapping[str, str]],
    ) -> list[str]:
        """Every sample in which running VMs broke a required anti-affinity rule."""
        rules = list(rules)
        found: list[str] = []
        for s in self.samples:
            found += [
                f"t={s.at:.2f} {p}"
                for p in anti_affinity_violations(rules, self.where(s), host_labels, vms)
            ]
        return found

    def first_all_running(
        self, keys: Iterable[str], after: float, away_from: str = ""
    ) -> float | None:
        """time.time() of the first sample after `after` in which every key ran on a host
        other than `away_from` (the failed one)."""
        wanted = set(keys)
        for s in self.samples:
            if s.at < after:
                continue
            where = self.where(s)
            if all(any(h != away_from for h in where.get(k, ())) for k in wanted):
                return s.at
        return None

    def max_gap(self) -> float:
        """The longest interval between two samples (the sampler's own resolution)."""
        times = [s.at for s in self.samples]
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


class LibvirtSampler(Sampler):
    """Lists the active domains of every host through its own libvirtd.

    With `running_only`, a paused domain does not count: the incoming side of a live
    migration is a paused domain that has executed nothing until libvirt hands over (and
    the source is paused by then), so "running on two hosts" is what would be a split brain.
    """

    def __init__(
        self,
        hosts: Mapping[str, str],
        vms: Iterable[str],
        interval: float = 0.1,
        running_only: bool = False,
    ) -> None:
        super().__init__(interval)
        self.running_only = running_only
        self.uris = dict(hosts)  # host -> libvirt URI reachable from here
        self._names: dict[str, str] = {}
        self.track(vms)
        self._conns: dict[str, libvirt.virConnect] = {}

    def track(self, vms: Iterable[str]) -> None:
        """Also recognise these VM keys' domains."""
        for key in vms:
            scope, _, name = key.partition("/")
            self._names[domain_name(scope, name)] = key

    def close(self) -> None:
        for conn in self._conns.values():
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()
        self._conns.clear()

    def _list(self, host: str) -> frozenset[str] | None:
        conn = self._conns.get(host)
        try:
            if conn is None:
                conn = self._conns[host] = libvirt.open(self.uris[host])
            active = conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        except libvirt.libvirtError:
            self._conns.pop(host, None)
            return None
        found = [d for d in active if d.name() in self._names]
        if self.running_only:
            found = [d for d in found if _running(d)]
        return frozenset(self._names[d.name()] for d in found)

    def take(self) -> Sample:
        running: dict[str, frozenset[str]] = {}
        unreachable: set[str] = set()
        for host in self.uris:
            found = self._list(host)
            if found is None:
                unreachable.add(host)
                found = frozenset()
            running[host] = found
        return Sample(time.time(), running, frozenset(unreachable))


def _running(dom: libvirt.virDomain) -> bool:
    """Running now; a domain gone between the list and the look (migrated away) is not."""
    try:
        return bool(dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING)
    except libvirt.libvirtError:
        return False


class EtcdSampler(Sampler):
    """What the agents report running (domains/<host>/ in etcd): the view for test:///
    hosts, whose domains live inside their agent process."""

    def __init__(self, endpoint: Endpoint, interval: float = 0.1) -> None:
        super().__init__(interval)
        self.endpoint = endpoint

    def take(self) -> Sample:
        running: dict[str, set[str]] = {}
        try:
            state = read_cluster(self.endpoint)
        except ObserveError:
            return Sample(time.time(), {}, frozenset({"etcd"}))
        for key, reports in state.domains.items():
            for d in reports:
                if d.state is DomainState.RUNNING:
                    running.setdefault(d.host, set()).add(key)
        return Sample(state.at, {h: frozenset(v) for h, v in running.items()}, frozenset())
