"""One VM's bad spec fails that VM, never the agent (issue 9, case 1): assignments written
straight into etcd, past the API's validation, against a real etcd and test:/// libvirt."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from agent.conftest import domain_status, put_assignment, vm
from hvplace.agent.config import AgentConfig
from hvplace.agent.service import Agent
from hvplace.proto.errors import InvalidInput
from hvplace.proto.records import DomainState, Image
from support.etcd import EtcdServer
from support.wait import eventually

StartAgent = Callable[[AgentConfig], Any]
NUL_IMAGE = Image(kernel="/boot/k", initrd="/boot/i", cmdline="console=ttyS0\x00rm -rf")


def _cfg(etcd: EtcdServer, make: Callable[..., AgentConfig], name: str) -> AgentConfig:
    return make(name, etcd_endpoints=(etcd.endpoint,))


async def _states(agent: Agent) -> dict[str, DomainState]:
    return {k: o.state for k, o in (await agent.hv.list_managed()).items()}


async def test_poison_assignments_fail_only_their_vm(
    etcd: EtcdServer, test_host: Callable[..., AgentConfig], run_agent: StartAgent
) -> None:
    """A NUL in the kernel command line and a control character XML cannot carry (the
    agent's own validator refuses both before libvirt sees them; libvirt-python would
    raise ValueError, its XML parser "PCDATA invalid Char value 1"): each VM is `failed`
    with the message, the VM beside them runs, and the agent's loop goes on (a later
    assignment still starts)."""
    agent = await run_agent(_cfg(etcd, test_host, "h1"))
    put_assignment(etcd, "h1", vm("good"))
    put_assignment(etcd, "h1", vm("nul", image=NUL_IMAGE))
    put_assignment(etcd, "h1", vm("ctl", description="bell \x01 here"))
    nul = await eventually(lambda: _failed(etcd, "nul"))
    assert "'\\x00'" in nul.last_error and nul.epoch == 1 and nul.uid == "uid-nul"
    ctl = await eventually(lambda: _failed(etcd, "ctl"))
    assert "control character '\\x01'" in ctl.last_error
    await eventually(lambda: _running(etcd, "good"))
    assert all(not t.done() for t in agent._tasks), "no agent task died"
    text = agent.metrics.exposition().decode()
    assert "hvplace_agent_hypervisor_up 1.0" in text  # a bad spec is no libvirt outage
    assert agent.health() == (True, "ok") and not agent.hypervisor_error
    put_assignment(etcd, "h1", vm("later"))
    await eventually(lambda: _running(etcd, "later"))
    states = await _states(agent)
    assert states.get("s/good") is DomainState.RUNNING
    assert states.get("s/later") is DomainState.RUNNING
    assert "s/nul" not in states or states["s/nul"] is not DomainState.RUNNING


async def test_a_failed_vm_is_not_retried_in_a_hot_loop(
    etcd: EtcdServer, test_host: Callable[..., AgentConfig], run_agent: StartAgent
) -> None:
    """The same assignment (uid, epoch) that failed is retried with a growing backoff,
    not on every pass; a new epoch is tried at once."""
    agent = await run_agent(_cfg(etcd, test_host, "h1"))
    put_assignment(etcd, "h1", vm("nul", image=NUL_IMAGE))
    await eventually(lambda: _failed(etcd, "nul"))
    before = agent.metrics.reconcile_errors._value.get()
    # Passes keep coming (resync every 1 s and each watch event) ...
    for i in range(6):
        put_assignment(etcd, "h1", vm(f"ok{i}"))
        await asyncio.sleep(0.3)
    await eventually(lambda: _running(etcd, "ok5"))
    # ... but the poison VM was not tried again on each of them.
    assert agent.metrics.reconcile_errors._value.get() - before <= 1
    put_assignment(etcd, "h1", vm("nul", image=NUL_IMAGE), epoch=2)
    st = await eventually(lambda: (s := _failed(etcd, "nul")) and s.epoch == 2 and s)
    assert "'\\x00'" in st.last_error


def _failed(etcd: EtcdServer, name: str) -> Any:
    st = domain_status(etcd, "h1", "s", name)
    return st if st is not None and st.state is DomainState.FAILED else None


def _running(etcd: EtcdServer, name: str) -> Any:
    st = domain_status(etcd, "h1", "s", name)
    return st if st is not None and st.state is DomainState.RUNNING else None


async def test_hypervisor_turns_any_exception_into_a_hypervisor_error(
    test_host: Callable[..., AgentConfig],
) -> None:
    """libvirt-python raises ValueError on a NUL; the adapter returns it typed, with the
    call (raw XML here: a record with a NUL never gets past the agent's validator)."""
    from hvplace.agent.hypervisor import HypervisorError, HypervisorUnavailable, LibvirtHypervisor
    from hvplace.proto.records import Assignment

    cfg = test_host("h1")
    hv = LibvirtHypervisor(
        cfg.libvirt_uri, images_dir=cfg.images, console_dir=cfg.consoles, state_dir=cfg.state_dir
    )
    await hv.open()
    try:
        bad = Assignment(vm=vm("nul", image=NUL_IMAGE), host="h1", epoch=1)
        with pytest.raises(InvalidInput, match="contains"):
            await hv.define(bad)
        try:
            await hv._call(hv._conn.defineXML, "<domain>\x00</domain>", what="defining raw")
        except HypervisorUnavailable:
            raise AssertionError("a bad spec is not the connection's fault") from None
        except HypervisorError as e:
            assert "defining raw" in e.message and "ValueError" in e.message
        else:
            raise AssertionError("defined a domain with a NUL in its XML")
        await hv.ping(1.0)  # the connection is fine
        assert await hv.list_managed() == {}
    finally:
        await hv.close()
