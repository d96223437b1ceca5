"""The API's business rules, one module per noun (vms, rules, hosts, cluster, images), their
replies apart (results.py), over one seam (backend.Backend). Validate first, check with
the engine, then write through the Backend's one fenced read-modify-write or the
planner's commit. gRPC-free: api.py only translates to and from proto.

A new noun is a module with a `Noun` subclass, one attribute here, and its servicer in
api.py."""

from __future__ import annotations

from hvplace.coordinator.operations.backend import Backend
from hvplace.coordinator.operations.cluster import Cluster
from hvplace.coordinator.operations.hosts import Hosts
from hvplace.coordinator.operations.images import Catalogue
from hvplace.coordinator.operations.noun import Noun
from hvplace.coordinator.operations.rules import Rules
from hvplace.coordinator.operations.vms import VMs
from hvplace.coordinator.rebalance import Mover, Rebalancing, with_degraded


class Operations:
    """Every API noun of one coordinator, over one Backend."""

    def __init__(
        self, backend: Backend, admission_on_create: bool = True, mover: Mover | None = None
    ) -> None:
        self.backend = backend
        # Rebalance, and --rebalance on rules, policies and host labels, move VMs through
        # `mover` (None: refused with `unavailable`).
        self.rebalancing = Rebalancing(
            lambda: with_degraded(backend.view().snapshot, backend.view().vm_status),
            backend.fresh_view,
            mover,
            Noun(backend).require_leader,
        )
        self.images = Catalogue(backend)
        self.vms = VMs(backend, self.images, admission_on_create=admission_on_create)
        self.rules = Rules(backend, self.rebalancing)
        self.hosts = Hosts(backend)
        self.cluster = Cluster(backend)
