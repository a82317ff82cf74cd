"""merbridge.cni: the chained CNI plugin ``merbridge-cni``.

Runs on the host once per pod start, so it is stdlib-only and quick to start:
it never imports bcc, kubernetes, pyroute2 or click. It parses the CNI call,
forwards it to the node daemon over a unix socket and passes ``prevResult``
through unchanged.
"""
