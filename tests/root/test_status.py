"""`merbridge status` on real pins: programs attached, enrolled pods with their
policies (joined with the CNI state file), map sizes — and it changes nothing."""
from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

from merbridge.bpf import loader, mesh
from merbridge.bpf.policy import PodPolicy
from merbridge.daemon import cli, state

pytestmark = pytest.mark.root


def test_status_lists_pods_policies_and_attachments(pin_dir, cgroup, tmp_path):
    dp = loader.Datapath(pin_dir, mesh.get("istio"), cni_mode=True)
    dp.load()
    try:
        dp.attach(cgroup)
        dp.maps.local_pods.put("10.233.0.7", PodPolicy(exclude_outbound_ports=frozenset({9090})))
        dp.maps.local_pods.put("10.233.0.8", PodPolicy(include_inbound_all=False,
                                                       include_inbound_ports=frozenset({80}),
                                                       dns_capture=True, proxy_uid=2000))
        dp.maps.mark_pod_ips.put(42, "10.233.0.7")
        rec = state.Record(container_id="c1", netns="/var/run/netns/x", ifname="eth0",
                           namespace="shop", name="cart-0", ips=("10.233.0.7/24",), key=42,
                           phase=state.ENROLLED)
        state.StateStore(str(tmp_path)).save({"c1": rec})
        # a read-only command must leave the state dir exactly as it was
        before = sorted(os.listdir(tmp_path))

        args = ["status", "--bpffs-path", pin_dir, "--cgroup-path", cgroup, "--state-dir", str(tmp_path)]
        res = CliRunner().invoke(cli.main, args + ["--json"])
        assert res.exit_code == 0, res.output
        out = json.loads(res.output)
        assert {"mb_connect4", "mb_sockops", "mb_getsockopt"} <= set(out["attached"])
        pods = {p["ip"]: p for p in out["pods"]}
        assert pods["10.233.0.7"]["name"] == "cart-0" and pods["10.233.0.7"]["mark"] == 42
        assert "9090" in pods["10.233.0.7"]["policy"]
        assert pods["10.233.0.8"]["name"] is None and pods["10.233.0.8"]["policy"].startswith("in: 80;")
        assert "dns captured; proxy uid 2000" in pods["10.233.0.8"]["policy"]
        assert "dns captured" not in pods["10.233.0.7"]["policy"]
        assert out["dns_queries_captured"] == 0

        text = CliRunner().invoke(cli.main, args)
        assert text.exit_code == 0, text.output
        assert "shop/cart-0 mark=42" in text.output and "pods:     2 in mb_local_pods" in text.output
        assert "dns:      0 queries captured" in text.output
        assert sorted(os.listdir(tmp_path)) == before
    finally:
        dp.detach()
        dp.unpin()
        dp.close()


def test_status_without_pins_says_so(tmp_path):
    res = CliRunner().invoke(cli.main, ["status", "--bpffs-path", str(tmp_path / "none"),
                                        "--state-dir", str(tmp_path)])
    assert res.exit_code == 1
    assert "not installed" in res.output
