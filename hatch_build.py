"""Build hook: generate the containerd front's protobuf modules with grpcio-tools.

Hatchling runs this for every wheel, editable or not (``pip install -e .``, ``scripts/bootstrap``,
``python -m build``), so the generated ``*_pb2.py``/``*_pb2.pyi`` files next to the ``.proto``
sources in ``snapdriver/containerd/proto/`` never live in git. ``python hatch_build.py``
regenerates them by hand in a venv that has grpcio-tools.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
PROTO_DIR = Path("snapdriver/containerd/proto")


def generate(root: Path = ROOT) -> list[str]:
    """Run protoc on every .proto under PROTO_DIR; return the generated paths (root-relative)."""
    from grpc_tools import protoc

    # Every file relative to one -I root: the name each is registered under (and imported by)
    # is then its package path, and an absolute path would load a file twice.
    sources = sorted(p.relative_to(root).as_posix() for p in (root / PROTO_DIR).glob("*.proto"))
    well_known = str(resources.files("grpc_tools") / "_proto")
    argv = ["protoc", f"-I{root}", f"-I{well_known}", f"--python_out={root}", f"--pyi_out={root}"]
    if protoc.main([*argv, *sources]) != 0:
        raise RuntimeError(f"protoc failed on {', '.join(sources)}")
    generated = []
    for source in sources:
        stem = source.removesuffix(".proto")
        generated += [f"{stem}_pb2.py", f"{stem}_pb2.pyi"]
    return generated


try:
    from hatchling.builders.hooks.plugin.interface import BuildHookInterface
except ImportError:  # run by hand, outside a build
    BuildHookInterface = object  # type: ignore[assignment,misc]


class ProtoBuildHook(BuildHookInterface):  # type: ignore[misc,valid-type]
    """Generate before a wheel is built; the files are git-ignored, so list them as artifacts."""

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel":
            return  # the sdist ships the .proto sources; its wheel build generates
        build_data["artifacts"].extend(generate(Path(self.root)))


if __name__ == "__main__":
    print("\n".join(generate()))
    sys.exit(0)
