"""merbridge.bpf: the eBPF datapath.

C sources (``include/``, ``progs/``) compiled at run time by bcc, their typed
Python mirrors (``types``) and the loader (``loader``), which is the only module
that imports bcc.
"""
