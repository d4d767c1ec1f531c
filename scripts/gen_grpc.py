"""Generate the gateway's Open Inference Protocol gRPC messages from their ``.proto``.

Run: .venv/bin/python scripts/gen_grpc.py [--check]

``src/bastion/gateway/grpc/inference.proto`` → ``inference_pb2.py`` and ``inference_pb2.pyi`` next to
it, with ``python -m grpc_tools.protoc`` (the messages only: the gateway builds its method table
from the service's descriptor, ``bastion.gateway.grpc.server``, so no ``_pb2_grpc`` module is
needed). One change is made to protoc's output: the file is added to a descriptor pool of its
own instead of protobuf's default one. Every OIP stub declares the same ``inference.*`` names
(tritonclient's among them), and the default pool refuses a second file that declares a name
already there: with its own pool, the gateway's module loads next to any client's.

``--check`` writes nothing and exits 1 when the committed modules differ from what would be
written (the output depends on the installed grpcio-tools, whose protobuf version it names).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
PACKAGE = SRC / "bastion" / "gateway" / "grpc"
PROTO = "inference.proto"
OUTPUTS = ("inference_pb2.py", "inference_pb2.pyi")
DEFAULT_POOL = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
OWN_POOL = (
    "# Bastion (scripts/gen_grpc.py): a descriptor pool of its own, so that another OIP stub's\n"
    "# inference.* names (tritonclient's) can load in the same process.\n"
    "DESCRIPTOR = _descriptor_pool.DescriptorPool().AddSerializedFile("
)


def generate() -> dict[str, str]:
    """The modules protoc writes for the ``.proto``, by file name, with the pool changed."""
    with tempfile.TemporaryDirectory() as out:
        subprocess.run(  # noqa: S603 - our own interpreter, fixed arguments
            [
                sys.executable,
                "-m",
                "grpc_tools.protoc",
                f"--proto_path={SRC}",
                f"--python_out={out}",
                f"--pyi_out={out}",
                str(PACKAGE / PROTO),
            ],
            check=True,
        )
        written = Path(out) / PACKAGE.relative_to(SRC)
        texts = {name: (written / name).read_text() for name in OUTPUTS}
    module = texts["inference_pb2.py"]
    if module.count(DEFAULT_POOL) != 1:
        raise SystemExit("protoc's output no longer adds the file to the default pool in one line: update gen_grpc.py")
    texts["inference_pb2.py"] = module.replace(DEFAULT_POOL, OWN_POOL)
    return texts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a module is stale")
    args = parser.parse_args(argv)
    texts = generate()
    stale = [
        name for name, text in texts.items() if not (PACKAGE / name).exists() or (PACKAGE / name).read_text() != text
    ]
    if args.check:
        for name in stale:
            print(
                f"stale: {(PACKAGE / name).relative_to(ROOT)} (run .venv/bin/python scripts/gen_grpc.py)",
                file=sys.stderr,
            )
        return 1 if stale else 0
    for name in stale:
        (PACKAGE / name).write_text(texts[name])
        print(f"wrote {(PACKAGE / name).relative_to(ROOT)}")
    if not stale:
        print("the generated gRPC modules are current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
