"""`hvplace image ...`: the image catalogue; add computes the files' digests locally."""

from __future__ import annotations

import argparse
import hashlib
from collections.abc import Iterable
from pathlib import Path

from hvplace.cli.client import Client
from hvplace.cli.render import emit, table
from hvplace.proto.errors import InvalidInput
from hvplace.proto.v1 import hvplace_pb2 as pb

IMAGE_HEADERS = ("NAME", "FILES", "CMDLINE")


def _image_rows(images: Iterable[pb.Image]) -> list[list[object]]:
    rows: list[list[object]] = []
    for i in images:
        files = [f"{f}={getattr(i, f)}" for f in ("kernel", "initrd", "disk") if getattr(i, f)]
        rows.append([i.name, " ".join(files), i.cmdline or "-"])
    return rows


def cmd_image_add(c: Client, args: argparse.Namespace) -> None:
    """The digests are computed here, from the files under --dir (a copy of what the
    hosts' image directories hold); the hosts check their own copies against them."""
    if bool(args.kernel) == bool(args.disk):
        raise InvalidInput("give --kernel (with --initrd, --cmdline) or --disk")
    if args.initrd and not args.kernel:
        raise InvalidInput("--initrd goes with --kernel")
    image = pb.Image(name=args.name, cmdline=args.cmdline)
    for field in ("kernel", "initrd", "disk"):
        relative = getattr(args, field)
        if relative:
            path = Path(args.dir) / relative
            try:
                with path.open("rb") as f:
                    digest = hashlib.file_digest(f, "sha256").hexdigest()
            except OSError as e:
                raise InvalidInput(f"--{field} {path}: {e.strerror}") from None
            setattr(image, field, relative)
            setattr(image, f"{field}_sha256", digest)
    resp: pb.Image = c.call("image", "AddImage", image)
    emit(args, resp, lambda: table(IMAGE_HEADERS, _image_rows([resp])))


def cmd_image_get(c: Client, args: argparse.Namespace) -> None:
    resp: pb.Image = c.call("image", "GetImage", pb.ImageRef(name=args.name))

    def text() -> str:
        digests = [
            f"{f}: {getattr(resp, f)} sha256 {getattr(resp, f + '_sha256')}"
            for f in ("kernel", "initrd", "disk")
            if getattr(resp, f)
        ]
        return "\n".join([f"image {resp.name}", *digests, f"cmdline: {resp.cmdline or '-'}"])

    emit(args, resp, text)


def cmd_image_list(c: Client, args: argparse.Namespace) -> None:
    resp: pb.ListImagesResponse = c.call("image", "ListImages", pb.Empty())
    emit(args, resp, lambda: table(IMAGE_HEADERS, _image_rows(resp.images)))


def cmd_image_delete(c: Client, args: argparse.Namespace) -> None:
    resp = c.call("image", "DeleteImage", pb.DeleteImageRequest(name=args.name, force=args.force))
    emit(args, resp, lambda: f"deleted image {args.name}")


def register(top: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    image = top.add_parser("image", help="the image catalogue VMs boot from").add_subparsers(
        dest="cmd", required=True
    )
    p = image.add_parser("add", help="add an image; its files' sha256 are computed from --dir")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--kernel", default="", help="kernel, relative to the image directories")
    p.add_argument("--initrd", default="", help="initrd, relative to the image directories")
    p.add_argument("--cmdline", default="", help="kernel command line")
    p.add_argument("--disk", default="", help="base disk, relative to the image directories")
    p.add_argument(
        "--dir", required=True, help="local copy of the hosts' image directory to hash from"
    )
    p.set_defaults(func=cmd_image_add)
    p = image.add_parser("get", help="an image's files and digests")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=cmd_image_get)
    p = image.add_parser("list", help="list images")
    p.set_defaults(func=cmd_image_list)
    p = image.add_parser("delete", help="delete an image (refused while VMs name it)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--force", action="store_true", help="even if VMs name it (they keep a copy)")
    p.set_defaults(func=cmd_image_delete)
