"""merbridge.daemon: the node daemon ``merbridge``.

Owns the pinned maps and attached programs, watches pods, turns sidecar
annotations into per-pod policy, serves the CNI plugin over a unix socket and
installs/removes the plugin in the node's CNI configuration.
"""
