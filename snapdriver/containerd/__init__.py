"""snapdriver's containerd front: the snapshots.v1 gRPC service of a proxy snapshotter.

containerd names snapshots by opaque keys; this front keeps its own key store (:mod:`.store`)
mapping each key to a layer of the core (hex IDs it makes itself), and serves the API
(:mod:`.service`, containerd's ``List`` filters in :mod:`.filters`) with grpc.aio on a unix socket
(:mod:`.server`). Run it with its own root, never a graphdriver Home (containerd's garbage
collector removes every snapshot it is shown and does not know)::

    python -m snapdriver.containerd --backend btrfs --root /var/lib/snapdriver-containerd \
        --listen unix:///run/snapdriver/containerd.sock

and load it in containerd's config (printed at start)::

    version = 2
    [proxy_plugins.snapdriver]
      type = "snapshot"
      address = "/run/snapdriver/containerd.sock"

The wire types are generated at install time from ``proto/*.proto`` (see :mod:`.proto`).
"""
