"""The wire: snapdriver's .proto text against containerd's own, and the status-code mapping."""

from __future__ import annotations

import errno
from importlib import resources
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FileDescriptor

from snapdriver.containerd.proto import mount_pb2
from snapdriver.containerd.proto import snapshots_pb2 as pb
from snapdriver.containerd.service import SERVICE, Servicer, grpc_status
from snapdriver.errors import (
    BackendError,
    ConfigError,
    LayerBusyError,
    LayerExistsError,
    LayerNotFoundError,
    NoSpaceError,
    NotInitialisedError,
    RequestError,
)

GOCODE = Path("/usr/share/gocode/src")
UPSTREAM = "github.com/containerd/containerd/api/services/snapshots/v1/snapshots.proto"
GOGO = GOCODE / "github.com/gogo/protobuf"

Shape = dict[str, object]


def shape(files: list[descriptor_pb2.FileDescriptorProto]) -> Shape:
    """What the wire depends on: packages, message fields, enums and methods."""
    found: Shape = {}
    for file in files:
        if not file.package.startswith("containerd."):
            continue
        for msg in file.message_type:
            found[f"{file.package}.{msg.name}"] = _fields(msg)
            for nested in msg.nested_type:
                found[f"{file.package}.{msg.name}.{nested.name}"] = _fields(nested)
        for enum in file.enum_type:
            found[f"{file.package}.{enum.name}"] = [(v.name, v.number) for v in enum.value]
        for service in file.service:
            found[f"{file.package}.{service.name}"] = [
                (m.name, m.input_type, m.output_type, m.server_streaming, m.client_streaming)
                for m in service.method
            ]
    return found


def _fields(msg: descriptor_pb2.DescriptorProto) -> list[tuple[object, ...]]:
    return [(f.name, f.number, f.type, f.label, f.type_name) for f in msg.field]


def ours() -> Shape:
    protos = []
    for module in (mount_pb2, pb):
        file: FileDescriptor = module.DESCRIPTOR
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)  # type: ignore[no-untyped-call]
        protos.append(proto)
    return shape(protos)


def upstream(tmp_path: Path) -> Shape:
    from grpc_tools import protoc

    out = tmp_path / "upstream.pb"
    well_known = resources.files("grpc_tools") / "_proto"
    argv = [
        "protoc",
        f"-I{GOCODE}",
        f"-I{GOGO}",
        f"-I{well_known}",
        "--include_imports",
        f"--descriptor_set_out={out}",
        UPSTREAM,
    ]
    assert protoc.main(argv) == 0
    return shape(list(descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file))


def test_same_wire_as_containerds_proto(tmp_path: Path) -> None:
    if not (GOCODE / UPSTREAM).exists() or not (GOGO / "gogoproto/gogo.proto").exists():
        pytest.skip(
            "containerd's .proto not here: apt-get install golang-github-containerd-containerd-dev "
            "golang-github-gogo-protobuf-dev"
        )
    theirs = upstream(tmp_path)
    mine = ours()
    assert sorted(mine) == sorted(theirs)
    for name, expected in theirs.items():
        assert mine[name] == expected, name


def test_every_method_is_served() -> None:
    methods = pb.DESCRIPTOR.services_by_name["Snapshots"].methods
    assert pb.DESCRIPTOR.services_by_name["Snapshots"].full_name == SERVICE
    handler = Servicer(service=None).handler()  # type: ignore[arg-type]

    class Details(grpc.HandlerCallDetails):
        def __init__(self, method: str) -> None:
            self.method = method
            self.invocation_metadata = ()

    for method in methods:
        found = handler.service(Details(f"/{SERVICE}/{method.name}"))
        assert found is not None, method.name
        assert bool(found.response_streaming) == method.server_streaming


@pytest.mark.parametrize(
    ("err", "code"),
    [
        (LayerNotFoundError("x"), grpc.StatusCode.NOT_FOUND),
        (LayerExistsError("x"), grpc.StatusCode.ALREADY_EXISTS),
        (LayerBusyError("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (RequestError("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (ConfigError("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (NotInitialisedError("x"), grpc.StatusCode.UNAVAILABLE),
        (NoSpaceError("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (OSError(errno.ENOSPC, "No space left on device"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (BackendError("x"), grpc.StatusCode.INTERNAL),
        (KeyError("x"), grpc.StatusCode.INTERNAL),
    ],
)
def test_status_mapping(err: Exception, code: grpc.StatusCode) -> None:
    assert grpc_status(err)[0] == code


def test_internal_errors_are_one_line() -> None:
    code, text = grpc_status(ValueError("first line\n  Traceback (most recent call last):\n..."))
    assert code == grpc.StatusCode.INTERNAL
    assert text == "internal error (ValueError): first line"
    assert grpc_status(RuntimeError())[1] == "internal error (RuntimeError): RuntimeError"
