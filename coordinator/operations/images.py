"""The image catalogue API calls: named images at /hvplace/v1/images/<name>, and the
resolution of a VM's image name into the catalogue's files and digests at create."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from hvplace.coordinator.operations.noun import Noun
from hvplace.coordinator.store import Txn
from hvplace.proto import codec, keyspace, validation
from hvplace.proto.errors import Conflict, InvalidInput, NotFound
from hvplace.proto.names import check_name, quote
from hvplace.proto.records import VM, Image

NOT_FOUND = "image {name!r} is not in the catalogue (see `hvplace image list`)"


def _users(vms: Sequence[VM], name: str) -> list[str]:
    return sorted(vm.key for vm in vms if vm.image.name == name)


class Catalogue(Noun):
    """Add, read and delete catalogue images; resolve the images VMs name."""

    async def add(self, image: Image) -> Image:
        """Store a new image; an existing name is a conflict (delete it first: VMs keep
        the copy they were created with)."""
        validation.validate_catalogue_image(image)
        self.require_leader()
        key = keyspace.image(image.name)

        async def add(txn: Txn) -> None:
            if await txn.get(key) is not None:
                raise Conflict(f"image {image.name!r} already exists; delete it first")
            txn.put(key, codec.dumps(image))

        await self.backend.update(add, subject=f"image {image.name!r}")
        return image

    async def get(self, name: str) -> Image:
        raw = await self.backend.read(keyspace.image(name))
        if raw is None:
            raise NotFound(NOT_FOUND.format(name=name))
        return codec.loads(Image, raw)

    async def list_all(self) -> list[Image]:
        return [codec.loads(Image, raw) for raw in await self.backend.read_prefix(keyspace.IMAGES)]

    async def delete(self, name: str, force: bool) -> None:
        """Refused while VMs name the image, unless forced (they keep their copy)."""
        check_name(name, "image name")
        self.require_leader()
        key = keyspace.image(name)

        async def remove(txn: Txn) -> None:
            if await txn.get(key) is None:
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
            txn.delete(key)

        await self.backend.update(remove, subject=f"image {name!r}")

    async def resolve(self, vms: Sequence[VM], txn: Txn) -> list[VM]:
        """Each VM that names only a catalogue image, with the image's files and digests
        (other VMs unchanged). The images are read through `txn`: the create commits only
        if none changed meanwhile (so a delete cannot slip in between). A name with
        files or digests beside it is refused."""
        images: dict[str, Image] = {}
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
                    raw = await txn.get(keyspace.image(image.name))
                    if raw is None:
                        raise NotFound(NOT_FOUND.format(name=image.name))
                    images[image.name] = codec.loads(Image, raw)
                vm = dataclasses.replace(vm, image=images[image.name])
            out.append(vm)
        return out
