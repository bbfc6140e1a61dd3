"""snapdriver's containerd front: the snapshots.v1 gRPC service of a proxy snapshotter.

containerd loads it as ``[proxy_plugins.NAME] type = "snapshot"``. containerd names snapshots by
opaque keys; this front keeps its own key store (:mod:`.store`) mapping each key to a layer of the
core (hex IDs it makes itself), and serves the API (:mod:`.service`) on a unix socket
(:mod:`.server`).
"""
