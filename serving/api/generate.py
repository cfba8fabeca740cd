"""Regenerates serving/api/cascade_pb2*.py from proto/cascade.proto.

protoc's virtual-path mapping (``-Iserving/api=proto``) makes the generated grpc module
import ``serving.api.cascade_pb2`` absolutely, so no sys.path tricks are needed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = REPO_ROOT / "proto"
PROTO_NAME = "cascade.proto"
PACKAGE_PATH = "serving/api"
GENERATED = ("cascade_pb2.py", "cascade_pb2.pyi", "cascade_pb2_grpc.py")


def generate(out_root: Path) -> list[Path]:
    """Writes the stubs under ``out_root/serving/api`` and returns their paths."""
    from grpc_tools import protoc  # build-time only dependency

    (out_root / PACKAGE_PATH).mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PACKAGE_PATH}={PROTO_DIR}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"{PACKAGE_PATH}/{PROTO_NAME}",
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO_DIR / PROTO_NAME}")
    return [out_root / PACKAGE_PATH / name for name in GENERATED]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out-root", type=Path, default=REPO_ROOT)
    args = parser.parse_args(argv)
    for path in generate(args.out_root):
        print(f"wrote {path.relative_to(args.out_root)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
