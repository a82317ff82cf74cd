"""The REAL daemon with ``--inbound-hook=xdp --hardware-checksum=true`` (the flag
means something for XDP only; tc leaves the offload on anyway): tx checksum
offload is the operator's business, so ADD leaves it on and CHECK does not ask for it off; the
rest of CHECK (here: the pod's ``mb_netns_pod`` entry) still applies.
"""
from __future__ import annotations

import pytest

from daemonkit import cid_of, cnitool_ok, direct, enrolled

pytestmark = pytest.mark.root

#: read by the daemon_world fixture (conftest.py)
DAEMON_ARGS = ("--inbound-hook=xdp", "--hardware-checksum=true")


def test_offload_left_on_and_check_still_sees_a_missing_netns_entry(daemon_world, pods):
    w = daemon_world
    pod = pods("hw")
    result = cnitool_ok(w, "add", pod)
    rec = enrolled(w, pod, result, hardware_checksum=True)   # offload still on
    cnitool_ok(w, "check", pod)
    assert w.maps.netns_pod.delete(rec["netns_cookie"])
    why = f"netns_pod has no entry for netns cookie {rec['netns_cookie']:#x}"
    p = w.cnitool("check", w.net, pod.ns, cni_args=pod.args)
    assert p.returncode != 0 and why in p.stderr and "tx checksum" not in p.stderr, p.stderr
    rc, out, err = direct(w, "ADD", pod, cid_of(pod), prev=result)
    assert (rc, out) == (0, result), err
    assert enrolled(w, pod, result, hardware_checksum=True)["key"] == rec["key"]
    cnitool_ok(w, "check", pod)
