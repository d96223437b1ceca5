"""`lab up` adds its tiny guest to the image catalogue: a VM created with `--image tiny`
(no host path in sight) boots on a real QEMU host from the agent's image directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hvplace.lab import daemons, observe, workload
from support.labs import LabFactory

pytestmark = pytest.mark.e2e


def test_a_vm_created_by_image_name_boots(make_lab: LabFactory) -> None:
    lab = make_lab(1, "real")
    state = lab.state()
    assert workload.image_args(state) == ["--image", daemons.GUEST_IMAGE_NAME]
    listed = json.loads(workload.hvplace(lab, "--json", "image", "list"))
    [image] = listed["images"]
    guest_dir = Path(state.guest_image["kernel"]).parent
    assert image["name"] == "tiny" and image["kernel"] == "vmlinuz"
    assert image["initrd"] == "initrd.img" and len(image["kernel_sha256"]) == 64
    workload.hvplace(lab, "vm", "create", "web-1", "--memory", "128", "--image", "tiny")
    observe.wait_for(
        lab.etcd_endpoint(), workload.all_running(["default/web-1"]), 120, "web-1 running"
    )
    view = json.loads(workload.hvplace(lab, "--json", "vm", "get", "web-1"))
    assert view["spec"]["image"]["name"] == "tiny"
    assert view["spec"]["image"]["kernel"] == "vmlinuz"  # relative: resolved on the host
    assert (guest_dir / "vmlinuz").is_file()
