"""Builds the tiny test guest from Debian packages: the cloud kernel plus a busybox initramfs.

`python -m hvplace.agent.guest_image` (or `hvplace-agent build-image`) caches
`vmlinuz` and `initrd.img` in /var/cache/hvplace/guest; the guest's init prints
`HVPLACE-GUEST-UP <hostname>` on ttyS0 and then idles, which is all the lab and tests need.
"""

from __future__ import annotations

import argparse
import gzip
import io
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CACHE = Path("/var/cache/hvplace/guest")
MARKER = "HVPLACE-GUEST-UP"
CMDLINE = "console=ttyS0 panic=-1 quiet"
KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX = Path("/bin/busybox")
INSTALL_HINT = "apt-get update && apt-get install -y busybox-static dpkg apt"

# The guest's hostname comes from `hvplace.hostname=` on the kernel command line, which
# the agent appends, so each guest announces which VM it is.
INIT_SCRIPT = f"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /bin /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
name=guest
for arg in $(cat /proc/cmdline); do
  case "$arg" in hvplace.hostname=*) name="${{arg#hvplace.hostname=}}" ;; esac
done
hostname "$name"
echo "{MARKER} $name" > /dev/ttyS0 2>/dev/null || echo "{MARKER} $name"
while true; do
  sleep 3600
done
"""


@dataclass(frozen=True, slots=True)
class GuestImage:
    kernel: Path
    initrd: Path

    @property
    def cmdline(self) -> str:
        return CMDLINE


def cached(cache_dir: Path = DEFAULT_CACHE) -> GuestImage | None:
    image = GuestImage(cache_dir / "vmlinuz", cache_dir / "initrd.img")
    return image if image.kernel.is_file() and image.initrd.is_file() else None


def _cpio_entry(name: str, mode: int, data: bytes = b"", ino: int = 1) -> bytes:
    """One `newc` cpio record (the format the kernel unpacks an initramfs from)."""
    namez = name.encode() + b"\0"
    fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(namez), 0]
    header = b"070701" + b"".join(f"{f:08x}".encode() for f in fields)
    out = header + namez
    out += b"\0" * (-len(out) % 4)
    out += data
    out += b"\0" * (-len(out) % 4)
    return out


def initramfs(busybox: bytes, init: str = INIT_SCRIPT) -> bytes:
    """A gzip'd newc archive with /init and /bin/busybox; built in Python, no cpio needed."""
    entries = [
        ("bin", 0o040755, b""),
        ("dev", 0o040755, b""),
        ("proc", 0o040755, b""),
        ("sys", 0o040755, b""),
        ("bin/busybox", 0o100755, busybox),
        ("bin/sh", 0o120777, b"busybox"),
        ("init", 0o100755, init.encode()),
    ]
    buf = io.BytesIO()
    for ino, (name, mode, data) in enumerate(entries, start=1):
        buf.write(_cpio_entry(name, mode, data, ino))
    buf.write(_cpio_entry("TRAILER!!!", 0, b"", 0))
    # mtime=0 keeps the archive byte-identical across builds.
    return gzip.compress(buf.getvalue(), mtime=0)


def _run(argv: list[str], cwd: Path | None = None) -> str:
    try:
        out = subprocess.run(argv, cwd=cwd, check=True, capture_output=True, text=True)
    except FileNotFoundError:
        raise RuntimeError(f"{argv[0]} is missing; install it with: {INSTALL_HINT}") from None
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"{' '.join(argv)} failed: {e.stderr.strip()[-2000:]}") from None
    return out.stdout


def kernel_package() -> str:
    """The versioned package the cloud meta-package depends on (e.g. linux-image-6.1.0-56-cloud-amd64)."""
    for line in _run(["apt-cache", "depends", KERNEL_META_PACKAGE]).splitlines():
        line = line.strip()
        if line.startswith("Depends: linux-image-"):
            return line.split(":", 1)[1].strip()
    raise RuntimeError(
        f"apt knows no {KERNEL_META_PACKAGE}; run `apt-get update` first (Debian amd64 needed)"
    )


def build(cache_dir: Path = DEFAULT_CACHE, force: bool = False) -> GuestImage:
    """Download and unpack the cloud kernel, write the initramfs; reuse the cache if present."""
    existing = cached(cache_dir)
    if existing is not None and not force:
        return existing
    if not BUSYBOX.is_file():
        raise RuntimeError(f"{BUSYBOX} is missing; install it with: {INSTALL_HINT}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    package = kernel_package()
    with tempfile.TemporaryDirectory(prefix="hvplace-guest-") as tmp:
        work = Path(tmp)
        # apt-get download runs as the `_apt` user when it can; a root-owned temp dir
        # would make it warn, so the folder is opened to it.
        os.chmod(work, 0o755)
        _run(["apt-get", "download", package], cwd=work)
        (deb,) = work.glob("*.deb")
        _run(["dpkg", "-x", str(deb), str(work / "root")])
        kernels = sorted((work / "root" / "boot").glob("vmlinuz-*"))
        if not kernels:
            raise RuntimeError(f"{deb.name} holds no /boot/vmlinuz-*")
        kernel_tmp = cache_dir / "vmlinuz.tmp"
        shutil.copyfile(kernels[-1], kernel_tmp)
    initrd_tmp = cache_dir / "initrd.img.tmp"
    initrd_tmp.write_bytes(initramfs(BUSYBOX.read_bytes()))
    # Rename last, so a half-built cache is never taken for a whole one.
    os.replace(initrd_tmp, cache_dir / "initrd.img")
    os.replace(kernel_tmp, cache_dir / "vmlinuz")
    (cache_dir / "kernel-package").write_text(package + "\n")
    image = cached(cache_dir)
    assert image is not None
    return image


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hvplace-agent build-image", description="Build the tiny hvplace test guest."
    )
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--force", action="store_true", help="rebuild even when cached")
    args = parser.parse_args(argv)
    try:
        image = build(args.cache_dir, force=args.force)
    except RuntimeError as e:
        print(f"build-image: {e}", file=sys.stderr)
        return 1
    print(f"kernel {image.kernel}\ninitrd {image.initrd}\ncmdline {image.cmdline}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
