"""Regenerate hvplace.proto.v1 from proto/hvplace.proto: `python -m hvplace.proto.generate`.

The .proto is staged at hvplace/proto/v1/ inside a scratch folder so the generated
modules import each other as `hvplace.proto.v1.*`. `--check` compares instead of writing
(the staleness test uses it).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "hvplace.proto"
TARGET = HERE / "v1"
OUTPUTS = ("hvplace_pb2.py", "hvplace_pb2.pyi", "hvplace_pb2_grpc.py", "hvplace_pb2_grpc.pyi")


def generate(out_dir: Path) -> None:
    """Write the generated modules for SOURCE into out_dir."""
    import grpc_tools
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp) / "src" / "hvplace" / "proto" / "v1"
        stage.mkdir(parents=True)
        shutil.copy(SOURCE, stage / "hvplace.proto")
        gen = Path(tmp) / "gen"
        gen.mkdir()
        include = Path(grpc_tools.__file__).parent / "_proto"
        bindir = Path(sys.executable).parent
        args = [
            "protoc",
            f"-I{Path(tmp) / 'src'}",
            f"-I{include}",
            f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
            f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
            f"--python_out={gen}",
            f"--grpc_python_out={gen}",
            f"--mypy_out={gen}",
            f"--mypy_grpc_out={gen}",
            "hvplace/proto/v1/hvplace.proto",
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in OUTPUTS:
            shutil.copy(gen / "hvplace" / "proto" / "v1" / name, out_dir / name)
        (out_dir / "__init__.py").write_text(
            '"""Generated from proto/hvplace.proto; do not edit."""\n'
        )


def stale_files() -> list[str]:
    """Names of generated files that differ from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        return [
            name
            for name in (*OUTPUTS, "__init__.py")
            if not (TARGET / name).exists()
            or (TARGET / name).read_bytes() != (fresh / name).read_bytes()
        ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the generated code is stale")
    args = parser.parse_args()
    if args.check:
        stale = stale_files()
        if stale:
            sys.exit(
                f"stale generated code: {', '.join(stale)}; run python -m hvplace.proto.generate"
            )
        print("generated code is up to date")
        return
    generate(TARGET)
    print(f"generated {', '.join(OUTPUTS)} in {TARGET}")


if __name__ == "__main__":
    main()
