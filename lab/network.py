"""The lab's private network: one bridge in the root namespace, one netns + veth pair per host.

Only addresses of the lab's own subnet are assigned, on links the lab created; nothing
is routed or NATed out of it.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import time


class NetworkError(RuntimeError):
    pass


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and out.returncode != 0:
        raise NetworkError(f"ip {' '.join(args)}: {out.stderr.strip()}")
    return out


def link_exists(name: str) -> bool:
    return ip("link", "show", "dev", name, check=False).returncode == 0


def netns_exists(name: str) -> bool:
    return name in netns_list()


def netns_list() -> list[str]:
    out = ip("-j", "netns", "list", check=False)
    if out.returncode != 0 or not out.stdout.strip():
        return []
    return [str(entry["name"]) for entry in json.loads(out.stdout)]


def links_with_prefix(prefix: str) -> list[str]:
    out = ip("-j", "link", "show")
    return [
        str(link["ifname"])
        for link in json.loads(out.stdout)
        if str(link["ifname"]).startswith(prefix)
    ]


def subnet_conflicts(subnet: ipaddress.IPv4Network) -> list[str]:
    """Addresses or routes of the root namespace that overlap `subnet` (the lab must own it)."""
    found: list[str] = []
    for entry in json.loads(ip("-j", "-4", "addr", "show").stdout):
        for addr in entry.get("addr_info", []):
            net = ipaddress.IPv4Network(f"{addr['local']}/{addr['prefixlen']}", strict=False)
            if net.overlaps(subnet):
                found.append(f"{entry['ifname']}: {addr['local']}/{addr['prefixlen']}")
    return found


def create_bridge(name: str, address: ipaddress.IPv4Interface) -> None:
    ip("link", "add", name, "type", "bridge")
    ip("addr", "add", str(address), "dev", name)
    ip("link", "set", name, "up")


def delete_link(name: str) -> None:
    if link_exists(name):
        ip("link", "del", name, check=False)


def create_host_network(
    netns: str, root_if: str, peer_if: str, bridge: str, address: ipaddress.IPv4Interface
) -> None:
    """A netns whose eth0 is the far end of a veth pair plugged into the lab bridge."""
    ip("netns", "add", netns)
    ip("link", "add", root_if, "type", "veth", "peer", "name", peer_if)
    ip("link", "set", root_if, "master", bridge, "up")
    ip("link", "set", peer_if, "netns", netns)
    ip("-n", netns, "link", "set", peer_if, "name", "eth0")
    ip("-n", netns, "addr", "add", str(address), "dev", "eth0")
    ip("-n", netns, "link", "set", "eth0", "up")
    # The agent and libvirtd may bind loopback; a new netns has it down.
    ip("-n", netns, "link", "set", "lo", "up")


def set_link_up(name: str, up: bool, timeout: float = 5.0) -> None:
    """Partition or heal a host: its bridge port goes down or up; the host side is untouched.

    Heal returns once the port forwards again, so traffic right after it gets through.
    """
    ip("link", "set", name, "up" if up else "down")
    deadline = time.monotonic() + timeout
    while up and not port_forwarding(name):
        if time.monotonic() > deadline:
            raise NetworkError(f"{name} is not forwarding {timeout}s after `ip link set up`")
        time.sleep(0.05)


def port_forwarding(name: str) -> bool:
    out = ip("-j", "-d", "link", "show", "dev", name, check=False)
    if out.returncode != 0:
        return False
    link = json.loads(out.stdout)[0]
    slave = link.get("linkinfo", {}).get("info_slave_data", {})
    return bool(link.get("operstate") == "UP" and slave.get("state", "forwarding") == "forwarding")


def link_is_up(name: str) -> bool:
    out = ip("-j", "link", "show", "dev", name, check=False)
    if out.returncode != 0:
        return False
    return "UP" in json.loads(out.stdout)[0].get("flags", [])


def delete_netns(name: str) -> None:
    if netns_exists(name):
        ip("netns", "del", name, check=False)
