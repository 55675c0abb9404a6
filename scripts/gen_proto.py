"""Regenerate the Python code for proto/, or check (--check) that the committed code is fresh.

The .proto files live in proto/fedgate/v1/ next to their generated modules, so `proto/` is both
the protoc include root and the source root of the `fedgate` wire package.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def _proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out_dir: Path) -> None:
    """Run protoc on every .proto file, failing on any warning."""
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    for proto in _proto_files():
        args = [
            "protoc",
            "--fatal_warnings",
            f"-I{PROTO_ROOT}",
            f"-I{well_known}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            str(proto.relative_to(PROTO_ROOT)),
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {proto.relative_to(ROOT)}")


def _generated(root: Path) -> dict[str, Path]:
    return {
        str(p.relative_to(root)): p
        for p in root.rglob("*")
        if p.is_file() and p.name.endswith(GENERATED_SUFFIXES)
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the committed code is stale")
    args = parser.parse_args()
    if not args.check:
        generate(PROTO_ROOT)
        print("regenerated:", ", ".join(sorted(_generated(PROTO_ROOT))))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh_root = Path(tmp)
        generate(fresh_root)
        fresh, committed = _generated(fresh_root), _generated(PROTO_ROOT)
        stale = sorted(
            name
            for name in fresh.keys() | committed.keys()
            if name not in fresh
            or name not in committed
            or not filecmp.cmp(fresh[name], committed[name], shallow=False)
        )
        if stale:
            print("generated code is stale: " + ", ".join(stale), file=sys.stderr)
            print("fix: python scripts/gen_proto.py, then commit the result", file=sys.stderr)
            return 1
    print("generated code is fresh")
    return 0


if __name__ == "__main__":
    sys.exit(main())
