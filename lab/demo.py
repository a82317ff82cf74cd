"""``merbridge-lab demo``: one small node, no Kubernetes, real traffic, and what happened to it.

The node (``demonode.Node``): pods in network namespaces networked through the
chained CNI by cnitool, haproxy sidecars as UID 1337, echo apps, and the real
``merbridge run --cni-mode=true`` with a static pod source -- three injected
pods (one with exclusion annotations) and one outside the mesh.

Then one connection per scenario below.  For each, the facts are measured:
which sidecar logged it and which original destination it saw (its
SO_ORIGINAL_DST answer), what the app saw as its peer, which kernel counters
moved.  The *why* is the daemon's decision as read back from the pinned maps
(``demoreport``), and each row says whether the facts agree with it.

Progress goes to stderr; the table (or ``--json``) to stdout; everything is
torn down in ``finally`` and checked gone.  Exit status 0 only when every
connection agreed and the teardown was clean; 2 when the host lacks something.
"""
from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any

from merbridge.lab import demoreport, lab
from merbridge.lab.cgroups import CGROUP_ROOT
from merbridge.lab.demonode import (A, CNI_PLUGIN_DIR, CNITOOL, MESH, NODE_PATH, DemoError,
                                    Node, PodSpec)
from merbridge.lab.lab import LabError

PODS = (
    PodSpec("backend", True, apps=(8080, 9090)),
    PodSpec("legacy", False, apps=(8080,)),
    PodSpec("frontend", True, proxy_env={"ISTIO_META_DNS_CAPTURE": "true"}),
    PodSpec("batch", True, annotations={A + "excludeOutboundPorts": "9090",
                                        A + "excludeOutboundIPRanges": "{legacy}/32"}),
)


@dataclass
class Scenario:
    title: str
    src: str
    dst: str
    port: int
    family: int = 4
    uid: int | None = None


SCENARIOS = (
    Scenario("mesh -> mesh", "frontend", "backend", 8080),
    Scenario("mesh -> mesh over IPv6", "frontend", "backend", 8080, family=6),
    Scenario("mesh -> pod outside the mesh", "frontend", "legacy", 8080),
    Scenario("outside the mesh -> mesh", "legacy", "backend", 8080),
    Scenario("excluded port", "batch", "backend", 9090),
    Scenario("same pod, port not excluded", "batch", "backend", 8080),
    Scenario("excluded CIDR", "batch", "legacy", 8080),
    Scenario("the sidecar's own traffic", "frontend", "legacy", 8080, uid=MESH.proxy_uid),
)


@dataclass
class DnsScenario:
    title: str
    src: str
    how: str             # "udp", "connected" or "tcp" (labconfig.DNS_QUERY)
    uid: int | None = None
    family: int = 4


#: queries to the DNS server in "legacy" (outside the mesh); frontend has DNS
#: capture (ISTIO_META_DNS_CAPTURE in its istio-proxy env), batch has not
DNS_SCENARIOS = (
    DnsScenario("app's DNS query, DNS capture on", "frontend", "udp"),
    DnsScenario("app's DNS query over IPv6", "frontend", "connected", family=6),
    DnsScenario("app's DNS query over TCP", "frontend", "tcp"),
    DnsScenario("the proxy's own DNS query", "frontend", "udp", uid=MESH.proxy_uid),
    DnsScenario("pod without DNS capture", "batch", "udp"),
)


class Progress:
    """Prints each step. Also where a SIGTERM is raised again when its
    KeyboardInterrupt went off inside code whose exceptions Python ignores (an
    at-fork hook, a finalizer): ``interrupt_pending`` stays set until then."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.interrupt_pending = False

    def check(self) -> None:
        if self.interrupt_pending:
            self.interrupt_pending = False
            raise KeyboardInterrupt

    def __call__(self, msg: str) -> None:
        self.check()
        print(f"[{time.monotonic() - self.t0:5.1f}s] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ preflight

def preflight() -> list[str]:
    """What this host lacks for the demo (empty: nothing); each item says how to fix it."""
    from merbridge.daemon import doctor
    problems = []
    # the demo mounts its own bpffs, so only the filesystem type must exist
    checks = [c for c in doctor.run_checks(bpffs_path="/sys/fs/bpf",
                                           cgroup_path=CGROUP_ROOT)
              if c.name != "bpffs"]
    for c in checks:
        if c.required and c.status != "ok":
            problems.append(f"{c.name}: {c.detail}" + (f" -- fix: {c.fix}" if c.fix else ""))
    try:
        with open("/proc/filesystems") as f:
            if not any(line.split()[-1] == "bpf" for line in f if line.strip()):
                problems.append("bpffs: the kernel has no bpf filesystem -- fix: a kernel "
                                "with CONFIG_BPF_SYSCALL")
    except OSError as exc:
        problems.append(f"bpffs: cannot read /proc/filesystems: {exc}")
    tools = {CNITOOL: "cnitool", f"{CNI_PLUGIN_DIR}/bridge": "the CNI bridge plugin",
             f"{CNI_PLUGIN_DIR}/host-local": "the CNI host-local plugin",
             "/usr/bin/python3": "the system python3"}
    for name in ("haproxy", "dnsmasq", "nsenter", "setpriv", "ss", "mount"):
        tools[shutil.which(name, path=NODE_PATH) or name] = name
    for path, what in tools.items():
        if not os.access(path, os.X_OK):
            problems.append(f"{what}: {path} is missing -- fix: run scripts/prepare-host")
    return problems


# ------------------------------------------------------------------ traffic

def _wait_logs(sidecars: dict, marks: dict[str, int], wanted: int) -> dict[str, list[dict]]:
    """New sidecar log entries since ``marks``: wait for ``wanted`` of them (2 s at
    most; they log when their upstream connects, so normally they are there), then
    settle briefly so an unexpected extra line is not missed."""
    deadline = time.monotonic() + 2.0
    while True:
        new = {n: s.entries(marks[n]) for n, s in sidecars.items()}
        if sum(map(len, new.values())) >= wanted or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    time.sleep(0.2)
    return {n: s.entries(marks[n]) for n, s in sidecars.items()}


def exercise(node: Node, progress: Progress) -> dict[str, Any]:
    """Make each scenario's connection; the report (see demoreport)."""
    views = node.pod_views()
    by_ip = {ip: v for v in views.values() for ip in v.ips}
    sidecars = {n: p.sidecar for n, p in node.pods.items() if p.sidecar is not None}
    rows = []
    for i, sc in enumerate(SCENARIOS, 1):
        dst = node.pods[sc.dst]
        dst_ip = dst.ip4 if sc.family == 4 else dst.ip6
        progress(f"connection {i}/{len(SCENARIOS)}: {sc.title}: {sc.src}"
                 + (f" (uid {sc.uid})" if sc.uid is not None else "")
                 + f" -> {sc.dst} {demoreport.hostport(dst_ip, sc.port)}")
        marks = {n: len(s.entries()) for n, s in sidecars.items()}
        before = node.counters()
        reply = node.pods[sc.src].connect(dst_ip, sc.port, payload=f"demo-{i}", uid=sc.uid)
        out_exp = demoreport.expect_outbound(views[sc.src], dst_ip, sc.port, sc.uid, by_ip, MESH)
        in_exp = demoreport.expect_inbound(views[sc.dst], sc.port)
        new = _wait_logs(sidecars, marks, int(out_exp.captured) + int(in_exp.captured))
        rows.append(demoreport.connection_row(
            title=sc.title, src=sc.src, dst=sc.dst, dst_ip=dst_ip, port=sc.port,
            family=sc.family, uid=sc.uid, reply=reply, new=new,
            delta=demoreport.counter_delta(before, node.counters()),
            out_exp=out_exp, in_exp=in_exp))
    dns_rows = []
    server = node.pods["legacy"]
    for sc in DNS_SCENARIOS:
        host = server.ip4 if sc.family == 4 else server.ip6
        progress(f"DNS query: {sc.title}: {sc.src}"
                 + (f" (uid {sc.uid})" if sc.uid is not None else "")
                 + f" -> {demoreport.hostport(host, 53)} {sc.how}")
        before = node.counters()
        got = node.pods[sc.src].dns_query(sc.how, host, node.DNS_NAME, uid=sc.uid)
        policy = views[sc.src].policy
        captured = bool(policy and policy.dns_capture and sc.uid != MESH.proxy_uid)
        dns_rows.append(demoreport.dns_row(
            title=sc.title, src=sc.src, uid=sc.uid, how=sc.how, server=host, got=got,
            want=node.DNS_PROXIED if captured else node.DNS_REAL, captured=captured,
            delta=demoreport.counter_delta(before, node.counters())))
    return {"pods": [{"name": v.name, "ips": list(v.ips), "enrolled": v.enrolled,
                      "reason": v.reason, "consistent": v.consistent,
                      "annotations": v.annotations,
                      "dns_capture": bool(v.policy and v.policy.dns_capture),
                      "sidecar": node.pods[v.name].sidecar is not None}
                     for v in views.values()],
            "connections": rows, "dns": dns_rows}


# ------------------------------------------------------------------ entry

_MAIN_PID = os.getpid()
_PROGRESS: Progress | None = None


def _interrupt(signum, frame) -> None:
    # helpers forked by pyroute2 (netns work) inherit this handler and are stopped
    # with SIGTERM: they must die as by default, not run the demo's teardown
    if os.getpid() != _MAIN_PID:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    if lab.interrupt_later():
        return    # raised when the create-and-record step under way ends
    if _PROGRESS is not None:
        _PROGRESS.interrupt_pending = True
    raise KeyboardInterrupt


def run(as_json: bool = False) -> int:
    """The ``merbridge-lab demo`` command; returns the exit status."""
    global _MAIN_PID, _PROGRESS
    _MAIN_PID = os.getpid()
    progress = _PROGRESS = Progress()
    progress("checking the host (merbridge doctor's checks, plus the demo's tools)")
    problems = preflight()
    if problems:
        print("merbridge-lab demo: this host cannot run the demo yet:\n  "
              + "\n  ".join(problems), file=sys.stderr)
        return 2
    node = Node(PODS, progress)
    report: dict[str, Any] = {}
    failure = None
    old = signal.signal(signal.SIGTERM, _interrupt)
    old_int = signal.signal(signal.SIGINT, _interrupt)
    old_hook = sys.unraisablehook

    def unraisable(info) -> None:
        # an interrupt Python had to drop is raised again at the next step: no traceback
        if not (isinstance(info.exc_value, KeyboardInterrupt) and progress.interrupt_pending):
            old_hook(info)
    sys.unraisablehook = unraisable
    try:
        node.setup()
        report = exercise(node, progress)
        progress.check()
        if not as_json:
            print(demoreport.render_pods(report))
            print(demoreport.render_table(report))
            print(demoreport.render_dns(report), flush=True)
    except KeyboardInterrupt:
        failure = "interrupted"
    except (DemoError, LabError) as exc:
        failure = str(exc)
    except Exception as exc:  # a clear line, not a traceback; teardown still runs
        failure = f"{type(exc).__name__}: {exc}"
    finally:
        # a second Ctrl-C or SIGTERM must not leave half the node behind
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        progress.interrupt_pending = False   # raised already, or recorded as failure below
        try:
            cleanup = node.teardown()
        finally:
            signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGTERM, old)
            sys.unraisablehook = old_hook
    report["node"] = node.describe()
    report["cleanup"] = cleanup
    report["error"] = failure
    agrees = (bool(report.get("connections")) and bool(report.get("dns"))
              and all(r["agrees"] for r in report["connections"] + report["dns"]))
    consistent = all(p["consistent"] for p in report.get("pods", []))
    report["ok"] = failure is None and agrees and consistent and cleanup["clean"]
    if as_json:
        print(demoreport.render_json(report), end="")
    else:
        done = ", ".join(k for k, v in cleanup["checked"].items() if v)
        left = ", ".join(k for k, v in cleanup["checked"].items() if not v)
        print(("clean: " + done) if cleanup["clean"] else
              f"NOT clean: {left} {'; '.join(cleanup['errors'])}".strip())
    if failure is not None:
        print(f"merbridge-lab demo failed: {failure}", file=sys.stderr)
    progress("done" if report["ok"] else "done, with problems (see above)")
    return 0 if report["ok"] else 1
