"""Regenerate the gRPC code from proto/ into the client package (``make proto``).

The generated modules live in one place, ``clients/python/weightd_client/_proto``, and
are never edited by hand; ``tests/test_proto.py`` fails when they are stale. The proto
file is mapped to the virtual path ``weightd_client/_proto/...`` so that the generated
imports point inside the client package.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO / "proto"
PROTO = PROTO_ROOT / "weightd" / "v1" / "weightd.proto"
OUT_ROOT = REPO / "clients" / "python"
GENERATED = ("weightd_pb2.py", "weightd_pb2.pyi", "weightd_pb2_grpc.py")
PACKAGE_DIR = Path("weightd_client") / "_proto" / "weightd" / "v1"


def generate(out_root: Path) -> Path:
    """Run protoc into ``out_root``; return the directory holding the generated files."""
    from grpc_tools import protoc  # dev dependency: only needed to regenerate

    args = [
        "grpc_tools.protoc",
        f"-I{Path('weightd_client') / '_proto'}={PROTO_ROOT}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        str(PROTO),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO}")
    return out_root / PACKAGE_DIR


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = generate(Path(tmp))
        dest = OUT_ROOT / PACKAGE_DIR
        dest.mkdir(parents=True, exist_ok=True)
        for name in GENERATED:
            shutil.copyfile(out / name, dest / name)
            print(f"wrote {dest / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
