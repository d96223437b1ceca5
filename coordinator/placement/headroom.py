"""Failover headroom kept between decisions (issue 14): free capacity per host for the
cache's placements, and per host what its failure would restart against the slots the
other hosts offer, moved for the hosts whose counts changed instead of recomputed.

Both live beside the snapshot's counters (`Usage.kept`), for one host table: a change of
hosts (a registration, a cordon) rebuilds them once, O(hosts); a placement moves one host.
"""

from __future__ import annotations

from collections.abc import Iterable

from hvplace.coordinator.placement.index import BaseFree, HostTable, base_free
from hvplace.coordinator.snapshot import Usage

Size = tuple[int, int, int]
"""(vcpus, memory MiB, disk GiB) of the largest VM a capacity bound is counted in."""
UNBOUNDED = 1 << 30


def slots_at(
    ready: list[bool], cpu: list[int], mem: list[int], disk: list[int], pos: int, size: Size
) -> int:
    """How many VMs of `size` the host at `pos` takes (0 when not ready)."""
    if not ready[pos]:
        return 0
    counts = [
        free // need
        for free, need in ((cpu[pos], size[0]), (mem[pos], size[1]), (disk[pos], size[2]))
        if need > 0
    ]
    return max(0, min(counts)) if counts else UNBOUNDED


class Headroom:
    """Per loaded host p without pinned VMs: `size` (the largest VM its failure restarts)
    and `need` = VMs restarted + p's own slots for that size. Scenario "p fails" passes
    the capacity bound iff need <= total slots for that size over the ready hosts, so a
    decision looks only at the hosts whose need exceeds the total (few), the hosts it
    touches and the pinned ones. Totals per size are kept per host change."""

    def __init__(self, table: HostTable, usage: Usage, free: BaseFree) -> None:
        self.table = table
        self.entry: dict[int, tuple[Size, int]] = {}
        self.pinned: set[int] = set()
        self.slot: dict[Size, list[int]] = {}
        self.totals: dict[Size, int] = {}
        self.refs: dict[Size, int] = {}
        self.needs: dict[Size, dict[int, set[int]]] = {}
        # Positions of the hosts with VMs assigned (single-host scenarios are theirs).
        self.loaded = {p for h in usage.by_host if (p := table.position.get(h)) is not None}
        for host in usage.restart:
            pos = table.position.get(host)
            if pos is not None:
                self._set(pos, usage, free)

    def _track(self, size: Size, free: BaseFree) -> None:
        t = self.table
        slot = [
            slots_at(t.ready, free.cpu, free.mem, free.disk, p, size) for p in range(len(t.names))
        ]
        self.slot[size] = slot
        self.totals[size] = sum(slot)
        self.refs[size] = 0
        self.needs[size] = {}

    def _set(self, pos: int, usage: Usage, free: BaseFree) -> None:
        """Recompute host `pos` from the counters (its slots for every tracked size first)."""
        t = self.table
        for size, slot in self.slot.items():
            now = slots_at(t.ready, free.cpu, free.mem, free.disk, pos, size)
            self.totals[size] += now - slot[pos]
            slot[pos] = now
        old = self.entry.pop(pos, None)
        if old is not None:
            size, need = old
            group = self.needs[size][need]
            group.discard(pos)
            if not group:
                del self.needs[size][need]
            self.refs[size] -= 1
        self.pinned.discard(pos)
        if t.names[pos] in usage.by_host:
            self.loaded.add(pos)
        else:
            self.loaded.discard(pos)
        sizes = usage.restart.get(t.names[pos])
        if not sizes:
            return
        count = cpu = mem = disk = 0
        for (c, m, d, pinned), n in sizes.items():
            if pinned:
                self.pinned.add(pos)
                return
            cpu, mem, disk = max(cpu, c), max(mem, m), max(disk, d)
            count += n
        size = (cpu, mem, disk)
        if size not in self.slot:
            self._track(size, free)
        need = count + self.slot[size][pos]
        self.entry[pos] = (size, need)
        self.needs[size].setdefault(need, set()).add(pos)
        self.refs[size] += 1

    def sync(self, usage: Usage, free: BaseFree, hosts: Iterable[str]) -> None:
        for host in hosts:
            pos = self.table.position.get(host)
            if pos is not None:
                self._set(pos, usage, free)
        for size in [s for s, n in self.refs.items() if n == 0]:
            for kept in (self.slot, self.totals, self.refs, self.needs):
                del kept[size]

    def total(
        self,
        size: Size,
        ready: list[bool],
        cpu: list[int],
        mem: list[int],
        disk: list[int],
        touched: Iterable[int],
    ) -> int | None:
        """Slots for `size` over the ready hosts when the free capacity is (`cpu`, `mem`,
        `disk`), differing from the kept one at `touched` only; None for a size not kept."""
        slot = self.slot.get(size)
        if slot is None:
            return None
        total = self.totals[size]
        for pos in touched:
            total += slots_at(ready, cpu, mem, disk, pos, size) - slot[pos]
        return total

    def over(
        self, ready: list[bool], cpu: list[int], mem: list[int], disk: list[int], touched: set[int]
    ) -> set[int]:
        """Hosts whose failure the capacity bound cannot settle when the free capacity is
        (`cpu`, `mem`, `disk`): it differs from the kept one at `touched` only."""
        found = set(self.pinned)
        for size, by_need in self.needs.items():
            total = self.total(size, ready, cpu, mem, disk, touched)
            assert total is not None  # every size with a need is kept
            for need, hosts in by_need.items():
                if need > total:
                    found |= hosts
        return found


def headroom(table: HostTable, usage: Usage) -> Headroom:
    """The headroom for `table`, brought up to date for the hosts that moved."""
    free = base_free(table, usage)
    kept: Headroom
    kept, dirty = usage.kept("headroom", table, lambda: Headroom(table, usage, free))
    if dirty:
        kept.sync(usage, free, dirty)
        dirty.clear()
    return kept
