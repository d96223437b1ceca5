"""A catalogue image's files on a host: found only inside the image directories, checked
against their sha256 (hashed once per file version), refused on escape or mismatch."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from hvplace.agent import config
from hvplace.agent.images import ImageFiles
from hvplace.proto.errors import InvalidInput
from hvplace.proto.records import VM, Image


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def vm_with(image: Image) -> VM:
    return VM(scope="acme", name="web", image=image)


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    first, second = tmp_path / "images", tmp_path / "cache"
    (first / "tiny").mkdir(parents=True)
    second.mkdir()
    (first / "tiny" / "vmlinuz").write_bytes(b"kernel")
    (second / "initrd.img").write_bytes(b"initrd")
    return first, second


TINY = Image(
    name="tiny",
    kernel="tiny/vmlinuz",
    kernel_sha256=sha(b"kernel"),
    initrd="initrd.img",
    initrd_sha256=sha(b"initrd"),
    cmdline="console=ttyS0",
)


def test_files_resolve_in_any_image_dir_and_are_hashed_once(dirs: tuple[Path, Path]) -> None:
    files = ImageFiles(dirs)
    vm = files.resolve(vm_with(TINY))
    assert vm.image == Image(
        kernel=os.path.realpath(dirs[0] / "tiny" / "vmlinuz"),
        initrd=os.path.realpath(dirs[1] / "initrd.img"),
        cmdline="console=ttyS0",
    )
    assert files.hashed == 2
    files.resolve(vm_with(TINY))
    assert files.hashed == 2  # cached by (path, inode, size, mtime)


def test_raw_host_paths_pass_through(dirs: tuple[Path, Path]) -> None:
    raw = vm_with(Image(kernel="/boot/vmlinuz"))
    assert ImageFiles(dirs).resolve(raw) is raw


def test_a_changed_file_fails_its_digest(dirs: tuple[Path, Path]) -> None:
    files = ImageFiles(dirs)
    files.resolve(vm_with(TINY))
    kernel = dirs[0] / "tiny" / "vmlinuz"
    kernel.write_bytes(b"kernel, tampered with")
    with pytest.raises(
        InvalidInput, match=r"image 'tiny' kernel .*tiny/vmlinuz: sha256 .* does not match"
    ):
        files.resolve(vm_with(TINY))


def test_a_symlink_out_of_the_image_dir_is_refused(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"host secret")
    (dirs[0] / "escape").symlink_to(secret)
    image = Image(name="evil", disk="escape", disk_sha256=sha(b"host secret"))
    with pytest.raises(InvalidInput, match="outside the image directory"):
        ImageFiles(dirs).resolve(vm_with(image))
    # A symlink that stays inside the directory is fine.
    (dirs[0] / "alias").symlink_to(dirs[0] / "tiny" / "vmlinuz")
    inside = Image(name="alias", kernel="alias", kernel_sha256=sha(b"kernel"))
    assert ImageFiles(dirs).resolve(vm_with(inside)).image.kernel.endswith("tiny/vmlinuz")


def test_a_missing_file_names_the_dirs(dirs: tuple[Path, Path]) -> None:
    image = Image(name="gone", disk="gone.qcow2", disk_sha256=sha(b""))
    with pytest.raises(InvalidInput, match=r"'gone.qcow2' is in none of this host's image dir"):
        ImageFiles(dirs).resolve(vm_with(image))


def test_an_unresolved_reference_is_refused(dirs: tuple[Path, Path]) -> None:
    with pytest.raises(InvalidInput, match="not resolved from the catalogue"):
        ImageFiles(dirs).resolve(vm_with(Image(name="tiny")))


def test_image_dirs_setting() -> None:
    cfg = config.load(None, env={})
    assert cfg.catalogue_dirs == (config.DEFAULT_IMAGE_DIR, cfg.guest_cache_dir)
    env = {"HVPLACE_AGENT_IMAGE_DIRS": "/srv/images, /var/cache/hvplace/guest"}
    cfg = config.load(None, env=env)
    assert cfg.catalogue_dirs == (Path("/srv/images"), Path("/var/cache/hvplace/guest"))
    with pytest.raises(InvalidInput, match="image_dirs: 'images' is not an absolute path"):
        config.load(None, env={"HVPLACE_AGENT_IMAGE_DIRS": "images"})
