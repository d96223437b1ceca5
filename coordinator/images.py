"""The image catalogue: named images at /hvplace/v1/images/<name>, and the resolution of
a VM's image name into the catalogue's files and digests at create. gRPC-free."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from hvplace.proto import codec, keyspace, validation
from hvplace.proto.errors import Busy, Conflict, InvalidInput, NotFound
from hvplace.proto.names import check_name, quote
from hvplace.proto.records import VM, Image

if TYPE_CHECKING:
    from hvplace.coordinator.operations import Backend


def _users(vms: Sequence[VM], name: str) -> list[str]:
    return sorted(vm.key for vm in vms if vm.image.name == name)


class Catalogue:
    """Add, read and delete catalogue images; resolve the images VMs name."""

    def __init__(self, backend: Backend, require_leader: Callable[[], None]) -> None:
        self.backend = backend
        self._require_leader = require_leader

    async def add(self, image: Image) -> Image:
        """Store a new image; an existing name is a conflict (delete it first: VMs keep
        the copy they were created with)."""
        validation.validate_catalogue_image(image)
        self._require_leader()
        key = keyspace.image(image.name)
        if not await self.backend.commit([(key, 0)], [(key, codec.dumps(image))]):
            raise Conflict(f"image {image.name!r} already exists; delete it first")
        return image

    async def get(self, name: str) -> Image:
        return (await self._read(name))[0]

    async def list_all(self) -> list[Image]:
        return [
            codec.loads(Image, value)
            for _key, value in await self.backend.list_prefix(keyspace.IMAGES)
        ]

    async def delete(self, name: str, force: bool) -> None:
        """Refused while VMs name the image, unless forced (they keep their copy)."""
        check_name(name, "image name")
        self._require_leader()
        key = keyspace.image(name)
        for _attempt in range(5):
            found = await self.backend.get(key)
            if found is None:
                raise NotFound(f"image {name!r} is not in the catalogue")
            users = _users(list((await self.backend.fresh_view()).vms.values()), name)
            if users and not force:
                shown = ", ".join(users[:5]) + (
                    f" and {len(users) - 5} more" if len(users) > 5 else ""
                )
                raise Conflict(
                    f"image {name!r} is used by {len(users)} VM(s) ({shown}); delete them"
                    " first or force (they keep their copy of the image)"
                )
            if await self.backend.commit([(key, found[1])], [], [key]):
                return
        raise Busy(f"image {name!r} kept changing while being deleted; retry")

    async def resolve(self, vms: Sequence[VM]) -> tuple[list[VM], list[tuple[str, int]]]:
        """Each VM that names only a catalogue image, with the image's files and digests
        (other VMs unchanged), and the (key, mod revision) of each image used: the create
        commits only if none changed meanwhile (so a delete cannot slip in between). A
        name with files or digests beside it is refused."""
        images: dict[str, tuple[Image, int]] = {}
        out = []
        for vm in vms:
            image = vm.image
            if image.name:
                if not image.is_reference:
                    raise InvalidInput(
                        f"VM {vm.key} names image {quote(image.name)} and gives files or a"
                        " command line too; give only the name"
                    )
                if image.name not in images:
                    images[image.name] = await self._read(image.name)
                vm = dataclasses.replace(vm, image=images[image.name][0])
            out.append(vm)
        return out, [(keyspace.image(n), rev) for n, (_i, rev) in sorted(images.items())]

    async def _read(self, name: str) -> tuple[Image, int]:
        found = await self.backend.get(keyspace.image(name))
        if found is None:
            raise NotFound(f"image {name!r} is not in the catalogue (see `hvplace image list`)")
        return codec.loads(Image, found[0]), found[1]
