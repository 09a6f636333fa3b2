"""Generate herd/protos/ from protos/*.proto (run by `make`; the output is never edited by hand).

protoc names modules after the proto path (herd/v1/experts.proto -> herd.v1.experts_pb2); the output
lives one package down, in herd.protos, so the generated imports and module names are rewritten to match.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "protos"
OUT = ROOT / "herd" / "protos"


def main(out: Path = OUT) -> int:
    """Generate into `out` (herd/protos of the checkout, or of a wheel's build directory)."""
    out.mkdir(parents=True, exist_ok=True)
    protos = sorted(str(p.relative_to(SOURCE)) for p in SOURCE.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = ["protoc", f"-I{SOURCE}", f"-I{include}", f"--python_out={out}", f"--pyi_out={out}",
            f"--grpc_python_out={out}", *protos]
    if protoc.main(args) != 0:
        print("protoc failed", file=sys.stderr)
        return 1
    for generated in out.rglob("*_pb2*.py*"):
        text = generated.read_text()
        fixed = re.sub(r"^from herd\.v1 import", "from herd.protos.herd.v1 import", text, flags=re.MULTILINE)
        # The messages' __module__ too, or pickle (Serve's gRPC proxy hands requests to replicas pickled)
        # looks for herd.v1.*_pb2, which does not exist.
        fixed = re.sub(r"(BuildTopDescriptorsAndMessages\(DESCRIPTOR, ')herd\.v1\.", r"\1herd.protos.herd.v1.", fixed)
        generated.write_text(fixed)
    for package in {p.parent for p in out.rglob("*_pb2.py")} | {out / "herd"}:
        (package / "__init__.py").touch()
    return 0


if __name__ == "__main__":
    sys.exit(main())
