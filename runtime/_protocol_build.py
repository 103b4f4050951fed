"""Generate the protobuf/gRPC modules of ``runtime.protocol`` from ``protos/``.

Why a module and not a Makefile rule: the same code runs from ``.ci/run``, from a
packaging build and, as a fallback, on first import in a source checkout.
"""
from __future__ import annotations

import sys
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent / "protocol"
REPO_ROOT = PACKAGE_DIR.parent.parent
PROTO_ROOT = REPO_ROOT / "protos"
PROTO_DIR = PROTO_ROOT / "runtime" / "protocol"


def _sources() -> list[Path]:
    return sorted(PROTO_DIR.glob("*.proto")) if PROTO_DIR.is_dir() else []


def is_stale() -> bool:
    """True when a generated module is missing or older than its .proto file."""
    for src in _sources():
        for suffix in ("_pb2.py", "_pb2_grpc.py"):
            out = PACKAGE_DIR / (src.stem + suffix)
            if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
                return True
    return False


def build() -> None:
    """Run grpc_tools.protoc over every .proto; raise with protoc's message on failure."""
    from grpc_tools import protoc  # build-time dependency (grpcio-tools)
    import grpc_tools

    include = str(Path(grpc_tools.__file__).parent / "_proto")
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}",
            f"--python_out={REPO_ROOT}", f"--pyi_out={REPO_ROOT}",
            f"--grpc_python_out={REPO_ROOT}"] + [str(p) for p in _sources()]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc} for {PROTO_DIR}")


def ensure_built() -> None:
    """Build when stale; a no-op for installed packages that ship generated code."""
    if not _sources():
        return  # installed without protos/: generated modules shipped with the package
    if is_stale():
        lock = PACKAGE_DIR / ".build.lock"
        import fcntl
        with open(lock, "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            if is_stale():
                build()


if __name__ == "__main__":
    build()
    print(f"generated {len(_sources())} protocol modules in {PACKAGE_DIR}", file=sys.stderr)
