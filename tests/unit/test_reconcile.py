"""The reconciler's replay of remembered fail-open ADDs (daemon/reconcile.py)."""
from __future__ import annotations

import json
import os

from merbridge.cni import pending, protocol
from merbridge.cni.errors import CniError
from merbridge.daemon.cniserver import CniServer
from merbridge.daemon.reconcile import Reconciler
from test_cniserver import FakeHandler

PREV = {"cniVersion": "1.0.0", "ips": [{"address": "10.244.1.2/24"}]}


def record(cid: str, name: str) -> bytes:
    env = {"CNI_COMMAND": b"ADD", "CNI_CONTAINERID": cid.encode(),
           "CNI_NETNS": b"/var/run/netns/p", "CNI_IFNAME": b"eth0", "CNI_PATH": b"/x",
           "CNI_ARGS": f"K8S_POD_NAMESPACE=default;K8S_POD_NAME={name}".encode()}
    conf = {"cniVersion": "1.0.0", "name": "n", "prevResult": PREV}
    return protocol.ExecRequest(env, json.dumps(conf).encode()).to_json()


class Registry:
    def __init__(self):
        self.unaccounted = ["default/lost"]
        self.calls = 0

    def adopt(self, pods, netns_dir, proc_path):
        self.calls += 1
        return 1 if self.calls == 1 else 0


class Later(FakeHandler):
    """Knows no pod called "later" yet: code 11, as the registry while the pod
    source has not listed it."""

    def add(self, req):
        if req.pod_name == "later":
            self.calls.append(("add", req))
            raise CniError(11, "pod not known yet", req.pod_name)
        return super().add(req)


def test_replay_enrols_keeps_and_drops(tmp_path):
    handler = Later()
    server = CniServer(str(tmp_path / "s.sock"), handler, allowed_uids=(os.getuid(),),
                       owner=None)
    pend = str(tmp_path / "pending")
    pending.remember(pend, "c1", record("c1", "web"))
    pending.remember(pend, "c2", record("c2", "later"))
    pending.remember(pend, "c3", b"not a record")
    reg = Registry()
    r = Reconciler(reg, server, lambda: [], pending_dir=pend, netns_dir=str(tmp_path / "ns"),
                   proc_path=None, state_dir=str(tmp_path))
    r.run_once()
    assert set(handler.enrolled) == {"c1"}
    assert [cid for cid, _ in pending.entries(pend)] == ["c2"]       # try again later
    assert r.totals == {"replayed": 1, "adopted": 1, "dropped": 1}
    status = json.load(open(tmp_path / "reconcile.json"))
    assert status["pending"] == ["c2"] and status["unenrolled"] == ["default/lost"]
    r.run_once()                                                      # kept, tried again
    assert [n for n, req in handler.calls if n == "add" and req.container_id == "c2"] == \
        ["add", "add"]
    assert r.totals["replayed"] == 1
