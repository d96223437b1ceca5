"""A catalogue image's files on this host: found only inside the configured image
directories (no symlink out of them) and checked against their sha256. Blocking: run it
on a worker thread (the hypervisor's define path does)."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
from collections.abc import Sequence
from pathlib import Path

from hvplace.proto.errors import InvalidInput
from hvplace.proto.records import VM, Image
from hvplace.proto.validation import IMAGE_FILES, has_image


class ImageFiles:
    """Resolves catalogue images inside `dirs`. Digests are cached by (path, inode,
    size, mtime), so a large base disk is hashed once, not on every define."""

    def __init__(self, dirs: Sequence[Path]) -> None:
        self.dirs = tuple(dirs)
        self._digests: dict[tuple[str, int, int, int], str] = {}
        self._lock = threading.Lock()
        self.hashed = 0
        """Files hashed (not served from the cache): for tests and curiosity."""

    def resolve(self, vm: VM) -> VM:
        """`vm` with its catalogue image's files as absolute host paths (digests checked);
        a VM with raw host paths unchanged. InvalidInput names the VM, the image and the
        file when one is missing, escapes its directory or does not match its digest."""
        image = vm.image
        if not image.name:
            return vm
        what = f"VM {vm.key} image {image.name!r}"
        if not has_image(image):
            raise InvalidInput(f"{what} has no files (it was not resolved from the catalogue)")
        paths: dict[str, str] = {}
        for field in IMAGE_FILES:
            relative = getattr(image, field)
            if not relative:
                continue
            path = self._find(relative, f"{what} {field} {relative!r}")
            digest = self._sha256(path)
            want = getattr(image, f"{field}_sha256")
            if digest != want:
                raise InvalidInput(
                    f"{what} {field} {path}: sha256 {digest[:16]}... does not match the"
                    f" catalogue's {want[:16]}... (the file changed since it was added)"
                )
            paths[field] = path
        return dataclasses.replace(vm, image=Image(cmdline=image.cmdline, **paths))

    def _find(self, relative: str, what: str) -> str:
        """The file in the first directory that has it; its real path must stay inside
        that directory (a symlink pointing out of it is refused, not followed)."""
        for d in self.dirs:
            root = os.path.realpath(d)
            candidate = os.path.join(root, relative)
            if not os.path.lexists(candidate):
                continue
            real = os.path.realpath(candidate)
            if not real.startswith(root + os.sep):
                raise InvalidInput(f"{what} resolves to {real}, outside the image directory {d}")
            if not os.path.isfile(real):
                raise InvalidInput(f"{what} in {d} is not a regular file")
            return real
        dirs = ", ".join(str(d) for d in self.dirs) or "none configured"
        raise InvalidInput(f"{what} is in none of this host's image directories ({dirs})")

    def _sha256(self, path: str) -> str:
        st = os.stat(path)
        key = (path, st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            cached = self._digests.get(key)
        if cached is not None:
            return cached
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        with self._lock:
            self._digests = {k: v for k, v in self._digests.items() if k[0] != path}
            self._digests[key] = digest
            self.hashed += 1
        return digest
