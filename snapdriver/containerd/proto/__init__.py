"""containerd's snapshots.v1 wire types, generated from the ``.proto`` files in this directory.

``mount.proto`` (package ``containerd.types``) and ``snapshots.proto`` (package
``containerd.services.snapshots.v1``) are snapdriver's own text of containerd 1.6's API: same
packages, names and field numbers, so the wire matches. ``hatch_build.py`` at the repository root
runs grpcio-tools' protoc on them during every wheel build, editable installs included, producing
``mount_pb2.py``/``snapshots_pb2.py`` and their ``.pyi`` stubs here (git-ignored, not linted).
Regenerate by hand with ``.venv/bin/python hatch_build.py``. No ``_pb2_grpc`` module is generated:
:mod:`snapdriver.containerd.service` registers its handlers from the service descriptor.
"""
