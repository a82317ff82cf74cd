"""``merbridge-lab demo`` end to end: the command as a user runs it (a subprocess of
the venv's console script), its facts against what the mesh semantics require,
and nothing of it left on the machine afterwards.

The expectations here are written from Istio's behaviour (what iptables
interception does to each connection), not read from the demo's own
"expected" fields, so a demo that misreports what its sidecars and apps saw
fails here even if it agrees with itself.
"""
import glob
import json
import os
import signal
import subprocess
import sys

import pytest

pytestmark = pytest.mark.root

MERBRIDGE_LAB = os.path.join(os.path.dirname(sys.executable), "merbridge-lab")


def _run(*args, **kw):
    return subprocess.run([MERBRIDGE_LAB, "demo", *args], capture_output=True, text=True,
                          timeout=180, **kw)


@pytest.fixture(scope="module")
def demo():
    proc = _run("--json")
    assert "Traceback" not in proc.stderr, proc.stderr
    report = json.loads(proc.stdout)
    return proc, report


def rows(report):
    return {(r["source"], r["uid"], r["destination"], r["dst_port"], r["family"]): r
            for r in report["connections"]}


def ips(report):
    return {p["name"]: p["ips"] for p in report["pods"]}


def hostport(ip, port):
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def test_exit_status_and_verdict(demo):
    proc, report = demo
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert report["ok"] is True and report["error"] is None
    assert len(report["connections"]) == 8
    assert all(r["ok"] for r in report["connections"])
    # progress went to stderr while it worked, the facts alone to stdout
    assert "connection 8/8" in proc.stderr and "tearing down" in proc.stderr


def test_pods_the_daemon_enrolled(demo):
    _, report = demo
    pods = {p["name"]: p for p in report["pods"]}
    assert {n for n, p in pods.items() if p["enrolled"]} == {"frontend", "backend", "batch"}
    assert pods["legacy"]["reason"] == "no istio-proxy container"
    assert all(p["consistent"] for p in pods.values())
    # ISTIO_META_DNS_CAPTURE in frontend's istio-proxy env only
    assert {n for n, p in pods.items() if p["dns_capture"]} == {"frontend"}
    for p in pods.values():       # both families from host-local, through the chained CNI
        v4, v6 = p["ips"]
        assert v4.startswith("10.241.0.") and v6.startswith("fd00:241::")


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_mesh_to_mesh_goes_through_both_sidecars(demo, family):
    _, report = demo
    r = rows(report)[("frontend", None, "backend", 8080, family)]
    dst = ips(report)["backend"][0 if family == "ipv4" else 1]
    assert r["dst_ip"] == dst
    assert r["outbound"]["intercepted"] and r["outbound"]["sidecar"] == "frontend"
    assert r["outbound"]["original_dst"] == hostport(dst, 8080)
    assert r["inbound"]["intercepted"] and r["inbound"]["sidecar"] == "backend"
    assert r["inbound"]["original_dst"] == hostport(dst, 8080)
    assert r["inbound"]["via"] == "connect hook"       # same node: the proxy's connect
    assert r["answered_by"] == "backend"
    assert r["app_peer"] == ("127.0.0.6" if family == "ipv4" else "::6")
    # the client app's own getpeername(): what it asked for, as under iptables
    assert r["client_peer"] == [dst, 8080]
    assert r["counters"].get("redirect_out") == 1 and r["counters"].get("redirect_in") == 1
    assert "istio sidecar injected" in r["expected"]["outbound_rule"]


def test_mesh_to_outside_is_captured_outbound_only(demo):
    _, report = demo
    r = rows(report)[("frontend", None, "legacy", 8080, "ipv4")]
    legacy, front = ips(report)["legacy"][0], ips(report)["frontend"][0]
    assert r["outbound"]["intercepted"] and r["outbound"]["sidecar"] == "frontend"
    assert r["outbound"]["original_dst"] == hostport(legacy, 8080)
    assert not r["inbound"]["intercepted"]
    assert r["app_peer"] == front                 # the sidecar connected from the pod IP
    assert "not in the mesh" in r["expected"]["inbound_rule"]


def test_outside_to_mesh_is_captured_inbound_by_xdp(demo):
    _, report = demo
    r = rows(report)[("legacy", None, "backend", 8080, "ipv4")]
    backend, legacy = ips(report)["backend"][0], ips(report)["legacy"][0]
    assert not r["outbound"]["intercepted"]
    assert r["inbound"]["intercepted"] and r["inbound"]["sidecar"] == "backend"
    assert r["inbound"]["via"] == "tc/XDP" and r["counters"].get("xdp_new_flow") == 1
    assert r["inbound"]["original_dst"] == hostport(backend, 8080)
    assert r["inbound"]["client"].startswith(legacy + ":")
    assert r["app_peer"] == "127.0.0.6"
    assert "no istio-proxy container" in r["expected"]["outbound_rule"]


def test_excluded_port_bypasses_the_own_sidecar_only_for_that_port(demo):
    _, report = demo
    table = rows(report)
    r = table[("batch", None, "backend", 9090, "ipv4")]
    assert not r["outbound"]["intercepted"]
    assert r["expected"]["outbound_rule"] == "batch: excludeOutboundPorts=9090"
    assert r["counters"].get("bypass_policy") == 1 and "redirect_out" not in r["counters"]
    # the destination still captures its inbound port, as iptables on it would
    assert r["inbound"]["intercepted"] and r["inbound"]["via"] == "tc/XDP"
    other = table[("batch", None, "backend", 8080, "ipv4")]
    assert other["outbound"]["intercepted"] and other["outbound"]["sidecar"] == "batch"


def test_excluded_cidr_is_not_intercepted_at_all(demo):
    _, report = demo
    r = rows(report)[("batch", None, "legacy", 8080, "ipv4")]
    legacy, batch = ips(report)["legacy"][0], ips(report)["batch"][0]
    assert not r["outbound"]["intercepted"] and not r["inbound"]["intercepted"]
    assert r["expected"]["outbound_rule"] == f"batch: excludeOutboundIPRanges={legacy}/32"
    assert r["app_peer"] == batch                 # straight from the app, no proxy between


def test_the_sidecars_own_traffic_is_not_captured_again(demo):
    _, report = demo
    r = rows(report)[("frontend", 1337, "legacy", 8080, "ipv4")]
    assert not r["outbound"]["intercepted"] and not r["inbound"]["intercepted"]
    assert r["counters"].get("bypass_proxy") == 1
    assert not {"redirect_out", "redirect_in", "xdp_new_flow"} & set(r["counters"])
    assert "proxy UID 1337" in r["expected"]["outbound_rule"]
    assert r["app_peer"] == ips(report)["frontend"][0]


def test_dns_queries(demo):
    """frontend's app queries go to its DNS proxy and are answered from the
    server's address; its proxy's own and batch's (no DNS capture) reach the
    server in legacy."""
    _, report = demo
    legacy = ips(report)["legacy"]
    got = {r["title"]: r for r in report["dns"]}
    assert len(got) == 5 and all(r["agrees"] for r in got.values())
    for title, server, answer in (
            ("app's DNS query, DNS capture on", legacy[0], "10.99.0.53"),
            ("app's DNS query over IPv6", legacy[1], "10.99.0.53"),
            ("app's DNS query over TCP", legacy[0], "10.99.0.53"),
            ("the proxy's own DNS query", legacy[0], "10.99.0.1"),
            ("pod without DNS capture", legacy[0], "10.99.0.1")):
        r = got[title]
        assert (r["answer"], r["reply_from"]) == (answer, [server, 53]), r
        assert r["counters"].get("dns_captured", 0) == (answer == "10.99.0.53")


def test_nothing_is_left_behind(demo):
    _, report = demo
    cleanup = report["cleanup"]
    assert cleanup["clean"] and not cleanup["errors"], cleanup
    assert len(cleanup["checked"]) >= 10 and all(cleanup["checked"].values())
    node = report["node"]
    name = node["name"]                                # mbdemo-<hex>
    assert name.startswith("mbdemo-") and node["netns"].startswith(name)
    # checked again from outside the demo
    assert not [n for n in os.listdir("/var/run/netns") if n.startswith(name)]
    assert not os.path.exists(node["cgroup"])
    assert not os.path.exists(node["bpffs"])
    with open("/proc/mounts") as f:
        assert name not in f.read()
    assert not glob.glob(f"/var/lib/cni/results/{name}-*")
    assert not os.path.exists(os.path.dirname(node["conflist"]))
    leftovers = []
    for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            with open(cmdline, "rb") as f:
                if name.encode() in f.read():
                    leftovers.append(cmdline)
        except OSError:
            pass
    assert not leftovers
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert name not in links and "mbd" + name.split("-")[1] not in links


def test_the_plain_command_prints_the_table_and_a_clean_line():
    proc = _run()
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "frontend -> backend 10.241.0." in out and "saw" in out
    assert "8/8 connections did what the daemon's policy says" in out
    assert out.rstrip().splitlines()[-1].startswith("clean: daemon exited cleanly")
    assert "[" in proc.stderr and "connection 1/8" in proc.stderr


def test_refuses_with_a_clear_message_when_the_host_lacks_something():
    # uid 0 without capabilities (a container's root that is not privileged):
    # the doctor's checks fail before anything is created. Still uid 0, so the
    # checkout stays readable wherever CI cloned it.
    before = set(os.listdir("/var/run/netns"))
    proc = subprocess.run(["setpriv", "--bounding-set=-all", "--inh-caps=-all",
                           MERBRIDGE_LAB, "demo"], capture_output=True, text=True, timeout=120,
                          cwd="/")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "this host cannot run the demo yet" in proc.stderr
    assert "privileges: running as uid 0 without CAP_NET_ADMIN, CAP_SYS_ADMIN" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert not {n for n in set(os.listdir("/var/run/netns")) - before if n.startswith("mbdemo-")}


#: the demo's progress lines up to the last connection (teardown ignores signals);
#: the first, the read-only host check, runs before anything is created
STEPS = 18


@pytest.mark.parametrize("step", range(2, STEPS + 1))
@pytest.mark.parametrize("sig", [signal.SIGTERM])
def test_interrupt_at_every_step_still_tears_everything_down(step, sig):
    """A signal right after the step-th progress line lands in whatever the demo
    does next: creating a netns (in a forked helper), mounting the bpffs,
    starting the daemon, a CNI ADD, a connection; nothing may be left."""
    _interrupt_and_check(step, sig)


def test_ctrl_c_mid_way_still_tears_everything_down():
    _interrupt_and_check(8, signal.SIGINT)


def _leftovers(name):
    """Anything of the demo called ``name`` that can outlive it."""
    with open("/proc/mounts") as f:
        mounts = [line.split()[1] for line in f if name in line]
    return sorted(glob.glob(f"/var/run/netns/{name}*") + glob.glob(f"/sys/fs/cgroup/{name}")
                  + glob.glob(f"/sys/fs/cgroup/*/{name}") + glob.glob(f"/tmp/{name}-*")
                  + glob.glob(f"/var/lib/cni/results/{name}-*") + mounts)


def _interrupt_and_check(step, sig):
    proc = subprocess.Popen([MERBRIDGE_LAB, "demo", "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    seen = []
    try:
        for line in proc.stderr:
            seen.append(line)
            if sum(1 for s in seen if s.startswith("[")) == step:
                proc.send_signal(sig)
                break
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert len([s for s in seen if s.startswith("[")]) == step, "".join(seen)
    report = json.loads(out)
    assert proc.returncode == 1 and report["error"] == "interrupted", "".join(seen) + err
    cleanup = report["cleanup"]
    assert cleanup["clean"], ([k for k, ok in cleanup["checked"].items() if not ok],
                              cleanup["errors"])
    assert "Traceback" not in err
    node = report["node"]
    assert node["name"].startswith("mbdemo-")
    assert not _leftovers(node["name"])
    if "cgroup" in node:          # set-up got as far as the lab
        assert not os.path.exists(node["cgroup"]) and not os.path.exists(node["root"])
