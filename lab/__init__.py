"""merbridge.lab: network-namespace labs, the demo and the test kit.

Not the product: a separate distribution (``merbridge-lab``, lab/setup.cfg)
that the node image never installs and that merbridge.daemon, merbridge.cni
and merbridge.bpf never import. It drives the product from outside, as an
operator or a container runtime would: named network namespaces with pods
(``netns``, ``lab``), child cgroups (``cgroups``), pod manifests for the pod
source (``manifests``), the real ``merbridge run`` on private pins, cgroup and
CNI dirs (``node.RealDaemon``), and ``merbridge-lab demo`` (``demo``).
"""
