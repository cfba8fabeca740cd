"""Regenerates serving/api/cascade_pb2*.py from proto/cascade.proto.

protoc's virtual-path mapping (``-Icatcascade/serving/api=proto``) makes the generated grpc
module import ``catcascade.serving.api.cascade_pb2`` absolutely (the installed name of
serving/api), so no sys.path tricks are needed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = REPO_ROOT / "proto"
PROTO_NAME = "cascade.proto"
PACKAGE_PATH = "serving/api"
MODULE_PATH = "catcascade/serving/api"  # what the stubs are named as, installed
GENERATED = ("cascade_pb2.py", "cascade_pb2.pyi", "cascade_pb2_grpc.py")


def generate(out_root: Path) -> list[Path]:
    """Writes the stubs under ``out_root/serving/api`` and returns their paths."""
    import tempfile

    from grpc_tools import protoc  # build-time only dependency

    (out_root / PACKAGE_PATH).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{MODULE_PATH}={PROTO_DIR}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"{MODULE_PATH}/{PROTO_NAME}",
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PROTO_DIR / PROTO_NAME}")
        for name in GENERATED:
            (out_root / PACKAGE_PATH / name).write_text((Path(tmp) / MODULE_PATH / name).read_text())
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
